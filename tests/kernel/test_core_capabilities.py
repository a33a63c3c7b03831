"""Which capability the kernel asks for the socket options the core sets: IP_TRANSPARENT and
IPV6_TRANSPARENT (its tproxy inbounds) and SO_MARK (its outbounds' mark). Measured on the running
kernel with a process whose bounding set holds only the capabilities under test, and held
against the shipped tproxyd-core.service: its CapabilityBoundingSet= must be the smallest set
that works (the weaker CAP_NET_RAW rather than CAP_NET_ADMIN, plus CAP_NET_BIND_SERVICE for a
port below 1024)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .netns import require_root

pytestmark = pytest.mark.root

CORE_UNIT = Path(__file__).resolve().parents[2] / "systemd" / "tproxyd-core.service"
# Each option, set on a fresh socket of its family; prints the errno name or "ok".
PROBE = """
import errno, socket, sys
SO_MARK, IP_TRANSPARENT, IPV6_TRANSPARENT = 36, 19, 75
options = {
    "IP_TRANSPARENT": (socket.AF_INET, socket.SOL_IP, IP_TRANSPARENT),
    "IPV6_TRANSPARENT": (socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_TRANSPARENT),
    "SO_MARK": (socket.AF_INET, socket.SOL_SOCKET, SO_MARK),
}
for name, (family, level, option) in options.items():
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(level, option, 1)
            print(name, "ok")
        except OSError as e:
            print(name, errno.errorcode[e.errno])
"""
OPTIONS = {"IP_TRANSPARENT", "IPV6_TRANSPARENT", "SO_MARK"}


def options_allowed(capabilities: list[str]) -> dict[str, str]:
    """Run PROBE as root with exactly `capabilities` (bounding, permitted and effective), in a
    network namespace of its own (it dies with the probe)."""
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in capabilities)])
    setpriv = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all"]
    proc = subprocess.run(
        ["unshare", "--net", "--", *setpriv, "--", sys.executable, "-c", PROBE],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(line.split() for line in proc.stdout.splitlines())


def unit_capabilities() -> set[str]:
    lines = [line for line in CORE_UNIT.read_text().splitlines() if line.startswith("CapabilityBoundingSet=")]
    assert len(lines) == 1, lines
    return set(lines[0].split("=", 1)[1].split())


@pytest.mark.parametrize(
    ("capabilities", "allowed"),
    [([], False), (["CAP_NET_BIND_SERVICE"], False), (["CAP_NET_RAW"], True), (["CAP_NET_ADMIN"], True)],
)
def test_which_capability_the_options_need(capabilities: list[str], allowed: bool) -> None:
    require_root()
    expected = "ok" if allowed else "EPERM"
    assert options_allowed(capabilities) == dict.fromkeys(OPTIONS, expected)


def test_the_core_unit_keeps_the_smallest_set_that_works() -> None:
    require_root()
    kept = unit_capabilities()
    assert options_allowed(sorted(kept)) == dict.fromkeys(OPTIONS, "ok")
    # CAP_NET_ADMIN would also do, and much more (routes, nftables, links): it must not be kept.
    assert kept == {"CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}, kept
