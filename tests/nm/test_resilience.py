"""Rules right again without anyone calling anything: a link recreated or renamed, NetworkManager
killed and restarted or absent at start, suspend and resume, and 100 up/down cycles."""

from __future__ import annotations

import asyncio

import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from tests.e2e import harness as e2e
from tproxy_service.bus import names
from tproxy_service.bus.call import call_method, method_call

from . import harness as h
from .test_policies import host_links, lan_links, wait_sets

pytestmark = pytest.mark.root


def default_via_cafe(w: h.World) -> bool:
    return f"default via {h.ROUTER_CAFE} dev {h.CAFE_LINK}" in h.in_ns(w.gw, "ip", "route", "show", "default").stdout


def cafe_proxied(w: h.World) -> h.World:
    """Starts tproxyd with the café connection up (and set to autoconnect, so NetworkManager
    brings it back by itself); returns once the café link is proxied."""
    assert w.core is not None
    w.nm.nmcli("connection", "modify", h.CAFE, "connection.autoconnect", "yes")
    w.tproxyd.start()
    w.nm.up(h.CAFE)
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied")
    return w


def test_recreated_and_renamed_link_stays_proxied(nm_world: h.World) -> None:
    w = cafe_proxied(nm_world)

    # Renamed: NetworkManager keeps the connection on the device, and the rules follow the name.
    h.in_ns(w.gw, "ip", "link", "set", h.CAFE_LINK, "down")
    h.in_ns(w.gw, "ip", "link", "set", h.CAFE_LINK, "name", "tpnvr")
    h.in_ns(w.gw, "ip", "link", "set", "tpnvr", "up")
    h.wait_until(lambda: w.nm.active().get(h.CAFE) == "tpnvr", 10, "the café connection on the renamed link")
    wait_sets(w, {"tpnvr"}, set(), "the renamed link proxied")
    h.in_ns(w.gw, "ip", "link", "set", "tpnvr", "down")
    h.in_ns(w.gw, "ip", "link", "set", "tpnvr", "name", h.CAFE_LINK)
    h.in_ns(w.gw, "ip", "link", "set", h.CAFE_LINK, "up")
    wait_sets(w, {h.CAFE_LINK}, set(), "the link proxied under its old name again")

    # Recreated: the connection goes with the link, autoconnects on the new one, and the policy
    # holds it again.
    w.delete_cafe_link()
    wait_sets(w, set(), set(), "the deleted link released")
    w.add_cafe_link()
    wait_sets(w, {h.CAFE_LINK}, set(), "the recreated link proxied")
    h.wait_until(lambda: default_via_cafe(w), 10, "the default route via the recreated café link")
    w.core.proxied(h.tcp_probe(w.gw))


def test_networkmanager_killed_and_restarted(nm_world: h.World) -> None:
    w = nm_world
    assert w.core is not None
    w.tproxyd.start()
    w.nm.up(h.CAFE)
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied")

    # A crashed NetworkManager leaves the link configured: its proxying stays (no leak).
    w.nm.kill()
    w.tproxyd.wait_log("NetworkManager left the system bus")
    assert host_links(w) == {h.CAFE_LINK}
    w.core.proxied(h.tcp_probe(w.gw))
    # While it is away the link is recreated, so the café connection will not be active when
    # NetworkManager returns: the state must then be corrected from its fresh facts.
    w.delete_cafe_link()
    w.add_cafe_link()
    mark = len(w.tproxyd.log_text())
    w.nm.start()
    w.tproxyd.wait_log("NetworkManager appeared on the system bus", after=mark)
    wait_sets(w, set(), set(), "the link released once NetworkManager says the café is not up")
    assert w.bus.properties()["ActiveLinks"] == []

    # The new NetworkManager instance is followed like the first one.
    w.nm.up(h.CAFE)
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied under the restarted NetworkManager")
    w.core.proxied(h.tcp_probe(w.gw))
    w.nm.down(h.CAFE)
    wait_sets(w, set(), set(), "the café link released under the restarted NetworkManager")


def test_networkmanager_absent_at_start_then_started(world: h.World) -> None:
    w = world
    assert w.core is not None
    w.tproxyd.start()
    w.tproxyd.wait_log("NetworkManager is not on the system bus")
    # Without NetworkManager, netlink alone: an auto link is host, local subnets are tracked.
    assert w.bus.tproxyd("EnableLink", "ss", [h.HOT_LINK, ""]).error is None
    wait_sets(w, {h.HOT_LINK}, set(), "auto without NetworkManager: host")
    h.in_ns(w.gw, "ip", "addr", "add", "10.42.5.1/24", "dev", h.HOT_LINK)
    h.wait_until(lambda: "10.42.5.0/24" in h.set_elements(w.gw, "local4"), 10, "10.42.5.0/24 in local4")
    h.in_ns(w.gw, "ip", "addr", "del", "10.42.5.1/24", "dev", h.HOT_LINK)

    w.nm.start()
    w.tproxyd.wait_log("NetworkManager appeared on the system bus")
    w.add_connections()
    w.nm.up(h.CAFE)
    wait_sets(w, {h.CAFE_LINK, h.HOT_LINK}, set(), "the café policy applied")
    w.core.proxied(h.tcp_probe(w.gw))
    w.nm.up(h.HOTSPOT)
    wait_sets(w, {h.CAFE_LINK}, {h.HOT_LINK}, "the auto link re-resolved to lan on the hotspot")
    w.core.proxied(h.tcp_probe(w.cli))


async def _emit_prepare_for_sleep(address: str, sleeping: bool) -> None:
    """A stand-in for logind: own its name on the sandbox's bus and announce a resume."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        await bus.request_name(names.LOGIN1_NAME)
        await bus.send(
            Message.new_signal(names.LOGIN1_PATH, names.LOGIN1_MANAGER_IFACE, "PrepareForSleep", "b", [sleeping])
        )
        # A round trip after the signal: the bus has routed it before we hang up.
        await call_method(bus, method_call(names.DBUS_NAME, names.DBUS_PATH, names.DBUS_IFACE, "GetId"))
    finally:
        bus.disconnect()


def nm_state(w: h.World) -> int:
    reply = w.bus.nm_property("State")
    assert reply.error is None, reply
    return int(reply.body[0])


def test_sleep_networking_off_and_resume(nm_world: h.World) -> None:
    w = cafe_proxied(nm_world)

    # NetworkManager's sleep (what it does on suspend). It leaves software links such as these
    # veths up (a Wi-Fi link would go down: the networking-off case below), so the café link
    # stays proxied; waking up is a re-apply.
    w.nm.sleep(True)
    h.wait_until(lambda: nm_state(w) == 10, 10, "NetworkManager asleep")
    assert host_links(w) == {h.CAFE_LINK}
    mark = len(w.tproxyd.log_text())
    w.nm.sleep(False)
    w.tproxyd.wait_log("NetworkManager woke up", after=mark)
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied after waking")

    # Networking off (airplane mode) takes every connection down; on again, the café
    # autoconnects and the policy holds its link again.
    w.nm.nmcli("networking", "off")
    wait_sets(w, set(), set(), "the café link released with networking off")
    w.nm.nmcli("networking", "on")
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied with networking on again")
    h.wait_until(lambda: default_via_cafe(w), 10, "the default route via the café link")
    w.core.proxied(h.tcp_probe(w.gw))

    # logind's PrepareForSleep(false): a re-apply, even with NetworkManager idle.
    mark = len(w.tproxyd.log_text())
    asyncio.run(_emit_prepare_for_sleep(w.bus.address, False))
    w.tproxyd.wait_log("resumed from suspend", after=mark)
    assert e2e.kernel_state(w.gw).complete and host_links(w) == {h.CAFE_LINK}


CYCLES = 100


def test_hundred_up_down_cycles_end_exact(nm_world: h.World) -> None:
    w = nm_world
    assert w.core is not None
    w.tproxyd.start()
    handle = h.table_handle(w.gw)
    for cycle in range(1, CYCLES + 1):
        # Every cycle's both states: a check after "down" alone would also pass while tproxyd
        # had not seen the "up" yet.
        w.nm.up(h.CAFE)
        wait_sets(w, {h.CAFE_LINK}, set(), f"the café link proxied in cycle {cycle}")
        w.nm.down(h.CAFE)
        wait_sets(w, set(), set(), f"the café link released in cycle {cycle}")

    # Exact: nothing in the link sets, one table, exactly one rule and route per family, never
    # rebuilt (every change was an element update), and the daemon never complained.
    assert (host_links(w), lan_links(w)) == (set(), set())
    state = e2e.kernel_state(w.gw)
    assert state.complete, state  # complete = exactly one rule and one route per family
    assert [t for t in state.tables if t == "inet tproxyd"] == ["inet tproxyd"]
    assert h.table_handle(w.gw) == handle
    props = w.bus.properties()
    assert (props["State"], props["ActiveLinks"], props["LastError"]) == ("active", [], "")
    log = w.tproxyd.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    # tproxyd runs in a PID namespace with its own /proc here (as in a container): its own
    # element updates must not look like someone else's (monitors/nft_events.py).
    assert "changed from outside" not in log, log[-3000:]

    w.nm.up(h.CAFE)
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied after the cycles")
    w.core.proxied(h.tcp_probe(w.gw))
