"""Properties: readable by anyone, read-only, and every change is sent in PropertiesChanged with
its new value, which an unprivileged client receives."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tproxy_service import __version__
from tproxy_service.bus import names
from tproxy_service.bus.spec import PROPERTIES

from . import harness as h
from .monitor import Monitor

pytestmark = pytest.mark.root


@pytest.fixture
def monitor(daemon: h.Tproxyd, bus: h.PrivateBus) -> Iterator[Monitor]:
    mon = Monitor(h.PLAIN, bus)
    yield mon
    rc, stderr = mon.stop()
    assert rc == 0, stderr


def test_plain_user_receives_every_change(daemon: h.Tproxyd, bus: h.PrivateBus, monitor: Monitor) -> None:
    initial = monitor.subscribed()
    assert set(initial) == {p.name for p in PROPERTIES}
    # The engine's core state (core supervision is tested with the core); Version never changes.
    assert initial["CoreState"] == bus.properties()["CoreState"] != ""
    assert initial["Version"] == __version__

    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    monitor.changed("Links", {h.LINK_A: "host", h.LINK_B: "lan"})
    monitor.changed("ActiveLinks", [h.LINK_A, h.LINK_B])

    assert bus.call("EnableLink", "ss", ["tpd-later", ""]).error is None  # auto, and absent
    monitor.changed("Links", {h.LINK_A: "host", h.LINK_B: "lan", "tpd-later": ""})

    assert bus.call("SetEnabled", "b", [False]).error is None
    monitor.changed("Enabled", False)
    monitor.changed("State", "off")
    monitor.changed("ActiveLinks", [])

    # A real kernel failure: with IPv6 disabled in the namespace the IPv6 policy route cannot be
    # added, so switching on fails, is rolled back, and LastError/State say so meanwhile.
    daemon.netns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1")
    failed = bus.call("SetEnabled", "b", [True])
    assert failed.error == names.ERROR_FAILED, failed
    monitor.changed("State", "failed")
    error_event = monitor.wait_for(
        lambda e: e["event"] == "changed" and e["changed"].get("LastError", "") != "", "LastError set"
    )
    assert "policy routing" in error_event["changed"]["LastError"]
    monitor.wait_for(
        lambda e: e["event"] == "changed" and e is not error_event and e["changed"].get("LastError") == "",
        "LastError cleared by the rollback",
    )
    daemon.netns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.lo.disable_ipv6=0")
    assert bus.properties()["Enabled"] is False

    daemon.write_config({h.LINK_A: "host"}, extra='[tproxy]\nfailure_policy = "closed"')
    assert bus.call("Reload").error is None
    monitor.changed("FailurePolicy", "closed")

    assert bus.call("SetEnabled", "b", [True]).error is None
    monitor.changed("Enabled", True)
    monitor.changed("State", "active")

    # The last value seen for each property is the daemon's current value.
    seen: dict[str, object] = {}
    for event in monitor.events:
        seen.update(event["changed"])
    assert seen == bus.properties()


def test_get_matches_getall_for_every_user(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    props = bus.properties()
    for prop in PROPERTIES:
        proc = h.as_user(
            h.PLAIN,
            ["busctl", "get-property", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, prop.name],
            bus.env(),
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split(" ", 1)[0] == prop.signature
        reply = bus.call("Get", "ss", [names.MANAGER_IFACE, prop.name], interface=names.PROPERTIES_IFACE)
        assert h.plain(reply.body[0]) == props[prop.name]


def test_properties_are_read_only_and_unknown_ones_refused(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    props = names.PROPERTIES_IFACE
    readonly = h.as_user(
        h.ROOT,
        ["busctl", "set-property", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, "Enabled", "b", "false"],
        bus.env(),
    )
    assert readonly.returncode != 0 and "read-only" in readonly.stderr
    assert bus.properties()["Enabled"] is True
    assert bus.call("Get", "ss", [names.MANAGER_IFACE, "Nope"], interface=props).error == names.ERROR_UNKNOWN_PROPERTY
    assert bus.call("Get", "ss", ["org.example.Nope", "State"], interface=props).error == names.ERROR_UNKNOWN_INTERFACE
    assert bus.call("GetAll", "s", ["org.example.Nope"], interface=props).error == names.ERROR_UNKNOWN_INTERFACE
    assert bus.call("GetAll", "i", [1], interface=props).error == names.ERROR_INVALID_ARGS
    assert h.plain(bus.call("GetAll", "s", [names.PEER_IFACE], interface=props).body) == [{}]
