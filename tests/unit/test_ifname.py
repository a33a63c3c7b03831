from __future__ import annotations

import pytest

from tproxy_service.errors import InvalidArgument
from tproxy_service.ifname import validate_ifname
from tproxy_service.model import FIXED_MODES, WITH_AUTO, LinkChoice


@pytest.mark.parametrize("name", ["eth0", "wlp3s0", "br-lan", "veth.100", "x" * 15, "wg_0", "tap@1"])
def test_valid(name: str) -> None:
    assert validate_ifname(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 16,
        "a/b",
        "a:b",
        "a b",
        "a\nb",
        "a\tb",
        ".",
        "..",
        'eth0"; flush ruleset',
        "x" * 70_000,
        "é" * 8,
        "a\x00",
    ],
)
def test_invalid(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_ifname(name)


def test_error_message_is_short_even_for_huge_input() -> None:
    with pytest.raises(InvalidArgument) as e:
        validate_ifname("y" * 70_000)
    assert len(str(e.value)) < 120


def test_modes() -> None:
    assert LinkChoice.parse("both", FIXED_MODES) is LinkChoice.BOTH
    assert LinkChoice.parse("auto", WITH_AUTO).mode is None
    with pytest.raises(InvalidArgument, match="no such mode 'auto-ish'"):
        LinkChoice.parse("auto-ish", WITH_AUTO)
    with pytest.raises(InvalidArgument, match=r"no such mode 'auto': use 'host', 'lan', 'both'$"):
        LinkChoice.parse("auto", FIXED_MODES)
