"""[[networkmanager.auto]] policies and auto mode against a real NetworkManager, real v2ray and
real traffic (see harness.py for the topology).

"Proxied": the server saw another source port than the client's and the core's access log lists
the flow. "Direct": the server saw the client's own port and the core never saw the flow."""

from __future__ import annotations

import pytest

from . import harness as h

pytestmark = pytest.mark.root


def host_links(w: h.World) -> set[str]:
    return h.set_elements(w.gw, "host_links")


def lan_links(w: h.World) -> set[str]:
    return h.set_elements(w.gw, "lan_links")


def wait_sets(w: h.World, host: set[str], lan: set[str], what: str) -> None:
    h.wait_until(lambda: (host_links(w), lan_links(w)) == (host, lan), 10, f"{what} (host_links, lan_links)")


def test_policy_connection_up_is_proxied_and_down_released(nm_world: h.World) -> None:
    w = nm_world
    w.tproxyd.start()
    assert w.core is not None
    # Policies but no matching connection: armed (table in place, empty sets), traffic direct.
    props = w.bus.properties()
    assert (props["State"], props["ActiveLinks"], props["Links"]) == ("active", [], {})
    handle = h.table_handle(w.gw)
    assert handle is not None and host_links(w) == set()
    w.core.direct(h.tcp_probe(w.gw))

    w.nm.up(h.CAFE)
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied as host")
    flow = h.tcp_probe(w.gw)
    assert flow.seen_peer == h.GW_CAFE, "the probe should have left via the café link"
    w.core.proxied(flow)
    props = w.bus.properties()
    # Auto-enabled links are active but not configured: `Links` lists manual choices only.
    assert (props["ActiveLinks"], props["Links"]) == ([h.CAFE_LINK], {})
    w.tproxyd.wait_log(f"{h.CAFE_LINK}: proxied as host while connection '{h.CAFE}' is on it")

    w.nm.down(h.CAFE)
    wait_sets(w, set(), set(), "the café link released")
    flow = h.tcp_probe(w.gw)
    assert flow.seen_peer == h.GW_FALLBACK, "with the café down the probe should take the fallback link"
    w.core.direct(flow)
    assert w.bus.properties()["ActiveLinks"] == []
    w.tproxyd.wait_log(f"{h.CAFE_LINK}: released (connection '{h.CAFE}' left it)")
    assert h.table_handle(w.gw) == handle, "a connection coming and going must not rebuild the table"


def test_shared_connection_is_proxied_as_lan(nm_world: h.World) -> None:
    w = nm_world
    w.tproxyd.start()
    assert w.core is not None
    w.nm.up(h.HOTSPOT)
    wait_sets(w, set(), {h.HOT_LINK}, "the hotspot link proxied as lan")
    # A client of the hotspot: its traffic goes through the core.
    w.core.proxied(h.tcp_probe(w.cli))

    # DisableLink of a link a policy holds: off now (client traffic direct through NM's NAT)...
    assert w.bus.tproxyd("DisableLink", "s", [h.HOT_LINK]).error is None
    wait_sets(w, set(), set(), "the hotspot link released by DisableLink")
    w.core.direct(h.tcp_probe(w.cli))
    # ... until the connection leaves the link: the next activation applies the policy again.
    w.nm.down(h.HOTSPOT)
    w.nm.up(h.HOTSPOT)
    wait_sets(w, set(), {h.HOT_LINK}, "the hotspot link proxied again after re-activation")
    w.core.proxied(h.tcp_probe(w.cli))


def test_auto_mode_resolves_from_the_connection_and_re_resolves(nm_world: h.World) -> None:
    w = nm_world
    w.tproxyd.write_config(policies=())  # no policies: only the manual auto choice
    w.tproxyd.start()
    assert w.core is not None
    assert w.bus.tproxyd("EnableLink", "ss", [h.HOT_LINK, ""]).error is None
    wait_sets(w, {h.HOT_LINK}, set(), "auto without a connection: host")

    w.nm.up(h.HOTSPOT)
    wait_sets(w, set(), {h.HOT_LINK}, "auto on a shared connection: lan")
    w.core.proxied(h.tcp_probe(w.cli))

    w.nm.up(h.PLAIN)  # another connection on the same link replaces the hotspot
    wait_sets(w, {h.HOT_LINK}, set(), "auto on a plain connection: host")

    w.nm.down(h.PLAIN)  # a manual choice stays when its connection leaves
    wait_sets(w, {h.HOT_LINK}, set(), "auto with the connection gone: host")
    props = w.bus.properties()
    assert props["Links"] == {h.HOT_LINK: ""} and props["ActiveLinks"] == [h.HOT_LINK]


def test_modified_addresses_after_reactivation_move_the_local_subnets(nm_world: h.World) -> None:
    w = nm_world
    w.tproxyd.write_config(policies=[{"id": h.PLAIN, "mode": "host"}])
    w.tproxyd.start()
    w.nm.up(h.PLAIN)
    wait_sets(w, {h.HOT_LINK}, set(), "the plain connection's link proxied")
    h.wait_until(lambda: "10.42.8.0/24" in h.set_elements(w.gw, "local4"), 10, "10.42.8.0/24 in local4")
    handle = h.table_handle(w.gw)

    w.nm.nmcli("connection", "modify", h.PLAIN, "ipv4.addresses", "10.42.9.1/24")
    w.nm.up(h.PLAIN)  # re-activation applies the change
    h.wait_until(
        lambda: {"10.42.9.0/24"} <= (local := h.set_elements(w.gw, "local4")) and "10.42.8.0/24" not in local,
        10,
        "local4 to follow the new address",
    )
    wait_sets(w, {h.HOT_LINK}, set(), "the link still proxied")
    assert h.table_handle(w.gw) == handle, "an address change must be an element update"
