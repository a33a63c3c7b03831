"""A changed list parsed in a child process: the same sets and the same errors as in the daemon,
and a SIGTERM (the cancel flag) ends the child at once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tproxy_service.bounded_read import Cancelled
from tproxy_service.cidrs import parse_list_bytes
from tproxy_service.errors import ConfigError
from tproxy_service.list_child import parse_in_child

PATH = Path("/lists/bypass.txt")


def test_the_same_sets_as_parsing_in_process() -> None:
    data = b"# list\n198.51.100.0/24\n203.0.113.7\n\n2001:db8::/32 # docs\n10.0.0.0/8\n255.255.255.0/24\n"
    assert parse_in_child(data, PATH, 100, small=0) == parse_list_bytes(data, PATH, 100)
    assert parse_in_child(b"", PATH, 100, small=0) == parse_list_bytes(b"", PATH, 100)


@pytest.mark.parametrize(
    ("data", "max_lines"),
    [(b"198.51.100.0/24\n198.51.100.0/33\n", 100), (b"\xff\xfe\n", 100), (b"1.2.3.4\n5.6.7.8\n", 1)],
)
def test_the_same_error_as_parsing_in_process(data: bytes, max_lines: int) -> None:
    with pytest.raises(ConfigError) as expected:
        parse_list_bytes(data, PATH, max_lines)
    with pytest.raises(ConfigError) as got:
        parse_in_child(data, PATH, max_lines, small=0)
    assert str(got.value) == str(expected.value)


def _children() -> set[int]:
    """Our child processes, zombies included."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            found.add(int(entry))
    return found


def test_cancel_kills_the_child() -> None:
    data = b"".join(f"{a}.{b}.{c}.0/24\n".encode() for a in range(11, 31) for b in range(250) for c in range(250))
    before = _children()  # (other tests' helpers may be our children too)
    cancel = threading.Event()
    running: set[int] = set()

    def sigterm() -> None:
        running.update(_children() - before)
        cancel.set()

    threading.Timer(0.3, sigterm).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        parse_in_child(data, PATH, 2_000_000, cancel, small=0)
    print(f"cancelled after {time.monotonic() - started:.2f} s")
    assert running, "no child was parsing when the cancel came"
    assert _children() <= before, "the child outlived the cancel"
