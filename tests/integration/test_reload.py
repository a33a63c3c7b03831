"""Reload and SIGHUP: list files are read off the event loop within limits, a refused reload
keeps the running configuration, toggles go on while a reload reads, SIGTERM ends tproxyd in
the middle of one, and SIGHUP takes the same path as D-Bus Reload (the same rollback)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tproxy_service.bus import names

from . import harness as h

pytestmark = pytest.mark.root


def write_config(daemon: h.Tproxyd, bypass: str = "", tproxy: str = "") -> None:
    daemon.write_config({h.LINK_A: "host"}, f"[tproxy]\n{tproxy}\n[bypass]\n{bypass}\n")


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "list.fifo"
    os.mkfifo(path)  # nobody ever writes to it
    return path


def test_reload_refuses_unbounded_list_files(daemon: h.Tproxyd, bus: h.PrivateBus, fifo: Path, tmp_path: Path) -> None:
    """/dev/zero, a FIFO with no writer and a 200 MB file are each refused at once with
    InvalidConfig naming the file and the limit; the running configuration stays."""
    sparse = tmp_path / "huge.txt"
    with sparse.open("wb") as f:
        f.truncate(200 << 20)
    before = (daemon.netns.kernel_state(), bus.properties())
    cases = [
        (fifo, "is a FIFO; only regular files are read"),
        (Path("/dev/zero"), "is a character device; only regular files are read"),
        (sparse, "is larger than 67108864 bytes ([bypass] max_file_bytes)"),
    ]
    for path, why in cases:
        write_config(daemon, f'files = ["{path}"]')
        started = time.monotonic()
        reply = bus.call("Reload")
        assert reply.error == names.ERROR_INVALID_CONFIG, (path, reply)
        # The config's file, line and key first, then the list file and the limit.
        assert reply.message.startswith(f"{daemon.config}:"), reply.message
        assert reply.message.endswith(f": bypass.files: CIDR list file {path} {why}"), reply.message
        print(f"{path}: refused in {time.monotonic() - started:.2f} s")
        assert (daemon.netns.kernel_state(), bus.properties()) == before
    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    assert daemon.rss_kb() < 200_000


def test_reload_with_a_missing_list_file_names_the_key_and_line_and_keeps_the_config(
    daemon: h.Tproxyd, bus: h.PrivateBus, tmp_path: Path
) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text("45.67.0.0/16\n")
    write_config(daemon, f'files = ["{listed}"]')
    assert bus.call("Reload").error is None
    assert "45.67.0.0/16" in daemon.netns.nft_table()
    before = (daemon.netns.kernel_state(), bus.properties())
    missing = tmp_path / "missing.txt"
    write_config(daemon, f'files = ["{missing}"]')
    line = next(n for n, text in enumerate(daemon.config.read_text().splitlines(), 1) if text.startswith("files"))
    reply = bus.call("Reload")
    assert reply.error == names.ERROR_INVALID_CONFIG, reply
    assert reply.message == (
        f"{daemon.config}:{line}: bypass.files: cannot read CIDR list file {missing}: No such file or directory"
    )
    assert (daemon.netns.kernel_state(), bus.properties()) == before  # the running config is kept


def _handles(daemon: h.Tproxyd) -> list[str]:
    """The handles of the table's sets, chains and rules: a rebuild gives them new numbers."""
    return re.findall(r"# handle (\d+)", daemon.netns.exec("nft", "-a", "list", "table", "inet", "tproxyd").stdout)


def test_a_changed_list_is_reloaded_in_place_and_a_settings_change_rebuilds(
    daemon: h.Tproxyd, bus: h.PrivateBus, tmp_path: Path
) -> None:
    """A Reload of a changed list file changes the bypass sets' elements only: every set, chain
    and rule keeps its handle, the new entries are in, the dropped ones out."""
    listed = tmp_path / "list.txt"
    listed.write_text("45.67.0.0/16\n9.9.9.0/24\n2001:db8:aa::/48\n")
    write_config(daemon, f'files = ["{listed}"]')
    assert bus.call("Reload").error is None
    before = _handles(daemon)
    assert len(before) > 10
    listed.write_text("45.67.0.0/16\n9.9.10.0/24\n2001:db8:bb::/48\n")
    assert bus.call("Reload").error is None
    table = daemon.netns.nft_table()
    assert "9.9.10.0/24" in table and "2001:db8:bb::/48" in table
    assert "9.9.9.0/24" not in table and "2001:db8:aa::/48" not in table
    assert _handles(daemon) == before, "the table was rebuilt for a list change"
    write_config(daemon, f'files = ["{listed}"]', tproxy="udp = false")
    assert bus.call("Reload").error is None
    assert _handles(daemon) != before and "9.9.10.0/24" in daemon.netns.nft_table()


@pytest.fixture
def slow_list(tmp_path: Path) -> Path:
    """Within the default limits (1M lines), yet seconds of parsing on this machine class."""
    path = tmp_path / "slow.txt"
    path.write_text("198.51.100.0/24\n" * 1_000_000)
    return path


def test_toggles_go_on_during_a_slow_reload_and_sigterm_ends_it(
    daemon: h.Tproxyd, bus: h.PrivateBus, slow_list: Path
) -> None:
    write_config(daemon, f'files = ["{slow_list}"]')
    offset = len(daemon.log.read_bytes())
    reload: dict[str, h.Reply] = {}
    caller = threading.Thread(target=lambda: reload.setdefault("reply", bus.call("Reload")), daemon=True)
    caller.start()
    h.wait_until(lambda: b"reloading the config" in daemon.log.read_bytes()[offset:], 10, "the reload to start reading")
    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    assert caller.is_alive(), "the reload finished before the toggle: the list is too small to prove anything"
    assert daemon.proc is not None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        returncode = daemon.proc.wait(5)
    except subprocess.TimeoutExpired:
        raise AssertionError("tproxyd did not end within 5 s of SIGTERM during a reload") from None
    print(f"SIGTERM during the reload: exited in {time.monotonic() - started:.2f} s")
    assert returncode == 0
    assert daemon.netns.nft_table() == ""  # it still removed its table on the way out
    caller.join(35)


def without_link_local(state: str) -> str:
    """Disabling IPv6 takes the link-local addresses (and so local6's elements) with it."""
    return "\n".join(line for line in state.splitlines() if "fe80::" not in line)


def test_sighup_rolls_back_like_reload(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    """With IPv6 disabled in the namespace the kernel refuses the IPv6 policy route a new
    `ipv6 = true` needs: SIGHUP, like Reload, rolls back to the running config."""
    write_config(daemon, tproxy="ipv6 = false")
    assert bus.call("Reload").error is None
    kernel_before = daemon.netns.kernel_state()
    daemon.netns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1")
    try:
        write_config(daemon, tproxy="ipv6 = true")
        offset = len(daemon.log.read_bytes())
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        h.wait_until(
            lambda: b"the previous one is kept" in daemon.log.read_bytes()[offset:], 20, "the SIGHUP reload to fail"
        )
        props = bus.properties()
        assert (props["State"], props["LastError"]) == ("active", "")
        assert without_link_local(daemon.netns.kernel_state()) == without_link_local(kernel_before)
        reply = bus.call("Reload")  # the D-Bus path says the same
        assert reply.error == names.ERROR_FAILED and "the previous one is kept" in reply.message
    finally:
        daemon.netns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.lo.disable_ipv6=0")
    daemon.proc.send_signal(signal.SIGHUP)
    h.wait_until(lambda: "ip6" in daemon.netns.nft_table(), 20, "the SIGHUP reload to apply ipv6 = true")
