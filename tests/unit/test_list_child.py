"""A changed list parsed in a child process: the same sets and the same errors as in the daemon,
and a SIGTERM (the cancel flag) ends the child at once."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from tproxy_service.bounded_read import Cancelled
from tproxy_service.errors import ConfigError
from tproxy_service.list_child import parse_in_child
from tproxy_service.list_files import parse_list_bytes

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


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("echo boom >&2; exit 1", "parsing CIDR list file /lists/bypass.txt failed: boom"),
        ("kill -KILL $$", "parsing CIDR list file /lists/bypass.txt failed: exit status -9"),
        ("printf '\\000\\000\\000\\000\\000\\000\\000\\011abc'", "failed: a malformed result"),
        ("printf 'xy'", "failed: a malformed result"),
    ],
)
def test_a_child_that_fails_is_a_config_error(
    script: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed or killed child, or one that writes something else, is a ConfigError saying so."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncat > /dev/null\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_in_child(b"198.51.100.0/24\n", PATH, 100, small=0)


def test_a_child_killed_by_the_stop_is_cancelled_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`systemctl stop` signals tproxyd's whole cgroup: a child that died of it before the cancel
    poll saw the flag is the stop, not a config error."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\ncat > /dev/null\nkill -TERM $$\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        parse_in_child(b"198.51.100.0/24\n", PATH, 100, cancel, small=0)
