"""`failure_policy = "closed"` means not one packet direct from a proxied link: what tproxyd
cannot divert is dropped (checked at the router with the leak probe), and only what the bypass
names goes direct."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import harness as h
from .conftest import StartDaemon

pytestmark = pytest.mark.root


def test_ipv6_and_udp_off_are_dropped_not_direct(lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path) -> None:
    config = h.TproxydConfig(tmp_path / "conf", failure_policy="closed", ipv6=False, udp=False)
    start_tproxyd(config, wait=False).wait_log("tproxyd ready")  # (no IPv6 rule and route to wait for)
    undivertable = [("udp", 4), ("udp", 6), ("tcp", 6)]
    with lab.leaks.no_client_packets():
        for proto, family in undivertable:
            lab.proofs.blocked(h.attempt(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family)))
        flow = h.send("tcp", h.CLI, h.CLIENT.v4, h.SERVER.v4)  # what can be diverted still is
        lab.proofs.proxied(flow, expected_peer=h.GW_UP.v4)
    for proto, family in undivertable:  # the gateway's own traffic on its host link
        lab.proofs.blocked(h.attempt(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family)))
    # The bypass still applies: a directly connected host is reached direct, UDP and IPv6 alike.
    for source, src in (("lan", h.CLI), ("gateway", h.GW)):
        for proto, family in undivertable:
            addr = (h.CLIENT if source == "lan" else h.GW_UP).of(family)
            lab.proofs.direct(h.send(proto, src, addr, h.ROUTER.of(family)))


HOSTILE_PREFIXES = ("130.0.0.1/1", "2000::1/3")  # what a hostile DHCP server or RA could hand out
SERVER_ROUTES = ((f"{h.SERVER.v4}/32", h.ROUTER.v4), (f"{h.SERVER.v6}/128", h.ROUTER.v6))


@pytest.fixture
def hostile_prefixes() -> Iterator[None]:
    """The gateway's upstream link gains prefixes that cover the server (still routed via the
    router: more specific routes); removed afterwards."""
    added: list[tuple[str, ...]] = []
    try:
        for cidr in HOSTILE_PREFIXES:
            h.add_addr(h.GW, h.UP_LINK, cidr)
            added.append(("ip", "addr", "del", cidr, "dev", h.UP_LINK))
        for dst, via in SERVER_ROUTES:
            h.add_route(h.GW, dst, via)
            added.append(("ip", "route", "del", dst, "via", via))
        yield
    finally:
        for cmd in reversed(added):
            h.in_ns(h.GW, *cmd, check=False)


def test_a_too_wide_connected_prefix_is_not_bypassed(
    lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path, hostile_prefixes: None
) -> None:
    daemon = start_tproxyd(h.TproxydConfig(tmp_path / "conf", failure_policy="closed"))
    with lab.leaks.no_client_packets():
        for proto in ("tcp", "udp"):
            for family in (4, 6):
                flow = h.send(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family))
                lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))
    # A sane prefix is still bypassed (the router's /24 and /64); the wide ones are logged.
    lab.proofs.direct(h.send("tcp", h.CLI, h.CLIENT.v4, h.ROUTER.v4))
    assert not h.set_has(h.GW, "local4", h.SERVER.v4) and not h.set_has(h.GW, "local6", h.SERVER.v6)
    daemon.wait_log("not bypassing connected prefixes")
    assert "130.0.0.1/1, 2000::1/3" in daemon.log_text()


def test_socket_bound_to_a_host_link_never_leaves_direct(
    lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path
) -> None:
    """A socket bound to the host link (SO_BINDTODEVICE, `curl --interface tpe-gu`) is marked in
    the output chain, but the re-route only considers routes through tpe-gu, so it would leave
    direct: under closed not one of its packets may reach the router."""
    start_tproxyd(h.TproxydConfig(tmp_path / "conf", failure_policy="closed"))
    for proto in ("tcp", "udp"):
        for family in (4, 6):
            lab.proofs.blocked(h.attempt(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family), device=h.UP_LINK))
            flow = h.send(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family))  # an unbound socket
            lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))
