"""NetworkManager and a real firewalld 1.3 (stock configuration) on the sandbox's bus: NetworkManager
puts its links into firewalld's zones itself (org.fedoraproject.FirewallD1), and when an admin
moves a connection to another zone (`connection.zone` + re-activation) its link stays proxied
while the new zone still guards the gateway itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.firewalld import Firewalld, missing

from . import harness as h

pytestmark = pytest.mark.root

GATEWAY_PORT = 8081  # a service on the gateway itself that no zone opens
ZONE = "block"  # rejects everything sent to the gateway


@pytest.fixture
def firewalld(nm_world: h.World) -> Iterator[Firewalld]:
    if problem := missing():
        pytest.skip(problem)
    fw = Firewalld(nm_world.workdir / "firewalld", nm_world.gw, bus_address=nm_world.bus.address)
    fw.dir.mkdir()
    try:
        fw.start()
        yield fw
    finally:
        fw.stop()
    # CleanupOnExit: firewalld takes its table with it.
    assert "inet firewalld" not in h.e2e.nft_tables(nm_world.gw)


def zone_of(fw: Firewalld, link: str) -> str:
    return fw.cmd(f"--get-zone-of-interface={link}", check=False).stdout.strip()


def admitted(ns: str) -> bool:
    """tproxyd's rule is somewhere in firewalld's table (traffic shows that it is where it works)."""
    table = h.in_ns(ns, "nft", "list", "table", "inet", "firewalld", check=False).stdout
    return "tproxyd: admit diverted packets" in table


def gateway_port_open(w: h.World) -> bool:
    """Does the client reach a service on the gateway's hotspot address?"""
    url = f"http://{h.HOTSPOT_GW}:{GATEWAY_PORT}/"
    return h.in_ns(w.cli, "curl", "-sS", "-m", "5", url, check=False).returncode == 0


def proxied_both_ways(w: h.World) -> None:
    """The hotspot's client (lan) and the gateway itself over the café link (host)."""
    assert w.core is not None
    w.core.proxied(h.tcp_probe(w.cli))
    flow = h.tcp_probe(w.gw)
    assert flow.seen_peer == h.GW_CAFE, "the probe should have left via the café link"
    w.core.proxied(flow)


def test_a_zone_change_through_networkmanager_keeps_the_links_proxied_and_the_gateway_guarded(
    nm_world: h.World, firewalld: Firewalld
) -> None:
    w = nm_world
    w.tproxyd.start()
    w.nm.up(h.CAFE)
    w.nm.up(h.HOTSPOT)
    h.wait_until(lambda: h.set_elements(w.gw, "lan_links") == {h.HOT_LINK}, 10, "the hotspot link proxied as lan")
    # NetworkManager, not the test, put the links into zones: a shared connection without a zone
    # into firewalld's nm-shared, the café connection into the default zone.
    h.wait_until(lambda: zone_of(firewalld, h.HOT_LINK) == "nm-shared", 20, "NetworkManager's zone for the hotspot")
    h.wait_until(lambda: zone_of(firewalld, h.CAFE_LINK) == "public", 20, "NetworkManager's zone for the café")
    h.wait_until(lambda: admitted(w.gw), 10, "tproxyd's rule in firewalld's input chain")
    proxied_both_ways(w)

    server = h.e2e.start_peer_server(w.gw, w.workdir / "gateway-service.log", (GATEWAY_PORT,), ())
    try:
        assert not gateway_port_open(w), "zone nm-shared should reject the client's connection to the gateway"
        for name in (h.HOTSPOT, h.CAFE):  # what an admin does to move a connection to a zone
            w.nm.nmcli("connection", "modify", name, "connection.zone", ZONE)
            w.nm.up(name)
        for link in (h.HOT_LINK, h.CAFE_LINK):
            h.wait_until(lambda link=link: zone_of(firewalld, link) == ZONE, 20, f"{link} in zone {ZONE}")
        h.wait_until(lambda: h.set_elements(w.gw, "lan_links") == {h.HOT_LINK}, 10, "the hotspot proxied again")
        assert admitted(w.gw)
        proxied_both_ways(w)
        # The new zone guards the gateway: its refusal, since opening the port there lets it in.
        assert not gateway_port_open(w), f"zone {ZONE} should reject the client's connection to the gateway"
        firewalld.cmd(f"--zone={ZONE}", f"--add-port={GATEWAY_PORT}/tcp")
        assert gateway_port_open(w), f"the gateway's service with its port open in zone {ZONE}"
    finally:
        h.e2e.stop_process(server)
