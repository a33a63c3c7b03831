"""Choices made over D-Bus are saved atomically and restored at start, across a clean restart and
a SIGKILL; [links] in the config are defaults that the saved choices override; a corrupt file is
moved aside (never silently dropped); a failed change changes nothing."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tproxy_service.bus import names

from . import harness as h
from .calls import finish_flood, start_flood
from .conftest import MakeDaemon

pytestmark = pytest.mark.root


def saved(daemon: h.Tproxyd) -> dict[str, object]:
    text = daemon.state_json()
    assert text is not None, "no state file"
    data: dict[str, object] = json.loads(text)
    return data


def test_choices_survive_a_restart(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    for call in (
        ["EnableLink", "ss", [h.LINK_B, "lan"]],
        ["EnableLink", "ss", ["tpd-absent", "both"]],
        ["EnableLink", "ss", ["tpd-auto", ""]],
        ["DisableLink", "s", [h.LINK_A]],  # a [links] default: remembered as disabled
        ["SetEnabled", "b", [False]],
    ):
        assert bus.call(*call).error is None, call
    assert saved(daemon) == {
        "version": 1,
        "enabled": False,
        "links": {h.LINK_A: "disabled", h.LINK_B: "lan", "tpd-absent": "both", "tpd-auto": "auto"},
    }
    before = bus.properties()
    assert daemon.stop() == 0
    assert daemon.netns.nft_table() == ""  # a clean stop removes everything
    daemon.start()
    assert bus.properties() == before
    assert before["Links"] == {h.LINK_B: "lan", "tpd-absent": "both", "tpd-auto": ""}
    assert before["Enabled"] is False and before["State"] == "off"
    assert daemon.netns.nft_table() == ""
    assert bus.call("SetEnabled", "b", [True]).error is None
    assert bus.properties()["ActiveLinks"] == [h.LINK_B]


def test_choices_survive_sigkill(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    assert bus.call("EnableLink", "ss", [h.LINK_B, "both"]).error is None
    table = daemon.netns.nft_table()
    daemon.stop(signal.SIGKILL)
    assert daemon.netns.nft_table() == table  # a crash leaves the rules: traffic keeps flowing
    daemon.start()
    props = bus.properties()
    assert props["Links"] == {h.LINK_A: "host", h.LINK_B: "both"}
    assert props["ActiveLinks"] == [h.LINK_A, h.LINK_B]
    assert daemon.netns.nft_table() == table
    tables = daemon.netns.exec("nft", "list", "tables").stdout.split("\n")
    assert tables.count("table inet tproxyd") == 1


def test_sigkill_during_a_burst_of_saves_leaves_a_valid_file(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    calls = [["EnableLink", "ss", [f"tpd-x{i}", "host"]] for i in range(50)]
    calls += [["DisableLink", "s", [f"tpd-x{i}"]] for i in range(50)]
    flood = start_flood(h.ROOT, bus, 4, 100, calls)
    h.wait_until(lambda: daemon.state_json() is not None, 20, "the first save")
    daemon.stop(signal.SIGKILL)
    finish_flood(flood)  # the calls in flight got errors (NoReply); the client survived
    assert saved(daemon)["version"] == 1  # old or new, never half of one
    daemon.start()
    leftovers = [p.name for p in daemon.state_dir.iterdir() if p.name != "state.json"]
    assert leftovers == [], "temp files of the interrupted save were not cleaned up"
    links = saved(daemon)["links"]
    assert isinstance(links, dict)
    props = bus.properties()
    assert props["Links"] == {h.LINK_A: "host", **{k: "" if v == "auto" else v for k, v in links.items()}}


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b'{"version": 2, "links": {}}',
        b'{"version": 1, "enabled": "yes", "links": {}}',
        b'{"version": 1, "links": {"eth/0": "host"}}',
        b'{"version": 1, "links": {"eth0": "sideways"}}',
        b'{"version": 1, "links": [], "extra": 1}',
        b"",
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json's parser: was a crash loop at start
    ],
    ids=[
        "truncated",
        "binary",
        "future-version",
        "bad-enabled",
        "bad-ifname",
        "bad-mode",
        "bad-shape",
        "empty",
        "deeply-nested",
    ],
)
def test_corrupt_state_file_is_moved_aside(make_daemon: MakeDaemon, bus: h.PrivateBus, content: bytes) -> None:
    daemon = make_daemon(links={h.LINK_A: "host"}, start=False)
    daemon.state_dir.mkdir()
    daemon.state_file.write_bytes(content)
    daemon.start()
    props = bus.properties()
    assert props["Links"] == {h.LINK_A: "host"} and props["Enabled"] is True  # the config's defaults
    aside = list(daemon.state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not daemon.state_file.exists()
    log = daemon.log.read_text()
    assert "corrupt" in log and str(aside[0]) in log
    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    assert saved(daemon)["links"] == {h.LINK_B: "lan"}


def test_saved_choices_override_config_defaults(make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    daemon = make_daemon(links={h.LINK_A: "host"})
    assert bus.call("EnableLink", "ss", [h.LINK_A, "lan"]).error is None
    daemon.write_config({h.LINK_A: "both", h.LINK_B: "host"})
    assert bus.call("Reload").error is None
    # tpdv0: the saved choice wins over the new default; tpdv1: a new default applies.
    assert bus.properties()["Links"] == {h.LINK_A: "lan", h.LINK_B: "host"}
    assert bus.call("DisableLink", "s", [h.LINK_B]).error is None
    assert saved(daemon)["links"] == {h.LINK_A: "lan", h.LINK_B: "disabled"}
    daemon.stop()
    daemon.start()
    assert bus.properties()["Links"] == {h.LINK_A: "lan"}


def test_idempotent_calls_do_not_rewrite(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    first = daemon.state_file.stat()
    table = daemon.netns.nft_table()
    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    assert bus.call("SetEnabled", "b", [True]).error is None  # never chosen, on by default: a choice
    second = daemon.state_file.stat()
    assert second.st_ino != first.st_ino  # SetEnabled(true) was recorded ...
    assert bus.call("SetEnabled", "b", [True]).error is None
    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    assert bus.call("DisableLink", "s", ["tpd-never"]).error is None
    third = daemon.state_file.stat()
    assert (third.st_ino, third.st_mtime_ns) == (second.st_ino, second.st_mtime_ns)  # ... repeats are not
    assert daemon.netns.nft_table() == table


def test_failed_change_is_rolled_back(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    """With IPv6 disabled in the namespace the kernel refuses tproxyd's IPv6 policy route: switching
    on fails with Failed, and the choice, the saved file and the kernel stay as they were."""
    assert bus.call("SetEnabled", "b", [False]).error is None
    saved_before, kernel_before = daemon.state_json(), daemon.netns.kernel_state()
    daemon.netns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1")
    try:
        reply = bus.call("SetEnabled", "b", [True])
        assert reply.error == names.ERROR_FAILED
        assert "rolled back" in reply.message and "policy routing" in reply.message
        props = bus.properties()
        assert props["Enabled"] is False and props["State"] == "off"
        assert daemon.state_json() == saved_before
        assert daemon.netns.kernel_state() == kernel_before
    finally:
        daemon.netns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.lo.disable_ipv6=0")
    assert bus.call("SetEnabled", "b", [True]).error is None
    assert bus.properties()["State"] == "active"


def test_link_that_appears_later_becomes_active(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    assert bus.call("EnableLink", "ss", ["tpd-late0", "lan"]).error is None
    assert bus.properties()["ActiveLinks"] == [h.LINK_A]
    daemon.netns.exec("ip", "link", "add", "tpd-late0", "type", "veth", "peer", "name", "tpd-late1")
    daemon.netns.exec("ip", "link", "set", "tpd-late0", "up")
    h.wait_until(lambda: "tpd-late0" in bus.properties()["ActiveLinks"], 10, "tpd-late0 to become active")
    assert '"tpd-late0"' in daemon.netns.nft_table()


def test_state_dir_is_created_and_file_is_world_readable(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    assert not daemon.state_dir.exists() or not daemon.state_file.exists()
    assert bus.call("EnableLink", "ss", [h.LINK_B, "host"]).error is None
    assert oct(daemon.state_file.stat().st_mode & 0o777) == oct(0o644)
    assert Path(daemon.state_file).read_text().endswith("\n")
