"""Which traffic goes through the core and which goes direct, with one running tproxyd
(`tpe-gc` = lan, `tpe-gu` = host) and real v2ray, nftables and netlink.

"Proxied": the server saw the gateway's address and a port that is not the client's, v2ray's
access log lists the flow, and none of the original packets reached the router.
"Direct": the server saw the client's own address and port, and v2ray never saw the flow.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import harness as h

pytestmark = pytest.mark.root

PROTOS = ("tcp", "udp")
FAMILIES = (4, 6)
each_flow_kind = pytest.mark.parametrize(
    ("proto", "family"), [(p, f) for p in PROTOS for f in FAMILIES], ids=lambda v: str(v) if v in PROTOS else f"v{v}"
)


@pytest.fixture(autouse=True)
def daemon(shared_tproxyd: h.Tproxyd) -> Iterator[h.Tproxyd]:
    yield shared_tproxyd
    assert shared_tproxyd.running, f"tproxyd died:\n{shared_tproxyd.log_text()[-3000:]}"


@each_flow_kind
def test_lan_client_traffic_is_proxied_without_leak(lab: h.Lab, proto: str, family: int) -> None:
    with lab.leaks.no_client_packets():
        flow = h.send(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family))
        lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))


@each_flow_kind
def test_gateway_own_traffic_on_host_link_is_proxied(lab: h.Lab, proto: str, family: int) -> None:
    # The gateway's address is the source either way: the access-log line and the server seeing
    # another source port (the core's socket, not curl's) are what prove the detour.
    flow = h.send(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family))
    lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))


BYPASSED = {
    "user-cidr": h.SERVER_USER_CIDR,  # [bypass] cidrs
    "list-file": h.SERVER_LIST_FILE,  # [bypass] files
    "local-subnet": h.ROUTER,  # directly connected to the gateway (documentation prefix)
    "local-private-subnet": h.ROUTER_PRIVATE,  # directly connected and reserved
    "reserved": h.SERVER_RESERVED,  # 172.16/12, fc00::/7 behind the router
}
SOURCES = {"lan-client": (h.CLI, h.CLIENT), "gateway-itself": (h.GW, h.GW_UP)}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("destination", BYPASSED)
@each_flow_kind
def test_bypassed_destination_goes_direct(lab: h.Lab, destination: str, source: str, proto: str, family: int) -> None:
    ns, src = SOURCES[source]
    flow = h.send(proto, ns, src.of(family), BYPASSED[destination].of(family))
    lab.proofs.direct(flow)
    assert lab.leaks.saw(flow), "the leak probe missed a direct flow: it would miss a leak too"


DNS_RESOLVERS = {
    # (namespace, source, resolver, address the resolver sees when the core forwards the query)
    "lan-client-to-upstream-router": (h.CLI, h.CLIENT, h.ROUTER, h.GW_UP),
    "lan-client-to-private-router": (h.CLI, h.CLIENT, h.ROUTER_PRIVATE, h.GW_PRIVATE),
    "gateway-itself-to-private-router": (h.GW, h.GW_PRIVATE, h.ROUTER_PRIVATE, h.GW_PRIVATE),
}


@pytest.mark.parametrize("case", DNS_RESOLVERS)
@each_flow_kind
def test_dns_to_directly_connected_resolver_is_proxied(lab: h.Lab, case: str, proto: str, family: int) -> None:
    # Port 53 to a local subnet is the classic DNS leak; dns_hijack keeps it on the core while
    # the same resolver on any other port is direct (test_bypassed_destination_goes_direct).
    ns, src, resolver, seen_as = DNS_RESOLVERS[case]
    flow = h.send(proto, ns, src.of(family), resolver.of(family), h.DNS_PORT)
    lab.proofs.proxied(flow, expected_peer=seen_as.of(family))
    assert f"accepted {proto}:{h.host_port(resolver.of(family), h.DNS_PORT)}" in lab.access.line_for(flow)


def test_new_gateway_address_joins_local_sets_live(lab: h.Lab) -> None:
    """An address added on a gateway link makes its subnet direct at once; removing it undoes that."""
    targets = [(proto, family) for proto in PROTOS for family in FAMILIES]
    for proto, family in targets:  # before: reached via the default route, so proxied
        flow = h.send(proto, h.CLI, h.CLIENT.of(family), h.ROUTER_LATE_SUBNET.of(family))
        lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))
    try:
        for cidr in (h.GW_LATE_SUBNET.v4, h.GW_LATE_SUBNET.v6):
            h.add_addr(h.GW, h.UP_LINK, cidr)
        for set_name, family in (("local4", 4), ("local6", 6)):
            # The gateway's new address and its neighbour: the whole subnet, not just the /32.
            for element in (h.GW_LATE_SUBNET.of(family).split("/")[0], h.ROUTER_LATE_SUBNET.of(family)):
                h.wait_until(lambda s=set_name, e=element: h.set_has(h.GW, s, e), 5, f"{element} in {set_name}")
        for proto, family in targets:
            lab.proofs.direct(h.send(proto, h.CLI, h.CLIENT.of(family), h.ROUTER_LATE_SUBNET.of(family)))
    finally:
        for cidr in (h.GW_LATE_SUBNET.v4, h.GW_LATE_SUBNET.v6):
            h.in_ns(h.GW, "ip", "addr", "del", cidr, "dev", h.UP_LINK, check=False)
    for set_name, family in (("local4", 4), ("local6", 6)):
        element = h.ROUTER_LATE_SUBNET.of(family)
        h.wait_until(lambda s=set_name, e=element: not h.set_has(h.GW, s, e), 5, f"{element} gone from {set_name}")
    for proto, family in targets:
        flow = h.send(proto, h.CLI, h.CLIENT.of(family), h.ROUTER_LATE_SUBNET.of(family))
        lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))


# --- the core's own port ---------------------------------------------------------------------------

_DIRECT = """
import socket, sys
proto, dst, sport, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET,
                  socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(3)
s.bind((dst, sport))
try:
    s.connect((dst, port))
    s.send(b"GET / HTTP/1.1\\r\\nHost: example.com\\r\\n\\r\\n")
    s.recv(100)  # UDP: a refusal arrives as an error here
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("no answer")
"""


@each_flow_kind
def test_direct_connection_to_the_tproxy_port_is_refused(lab: h.Lab, proto: str, family: int) -> None:
    """A local user talking straight to the core's tproxy port: the core would take the port itself
    as the destination and connect to it, again and again (a loop). The table's guard refuses it."""
    dst = "127.0.0.1" if family == 4 else "::1"
    sport = h.next_source_port()
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", _DIRECT]
    proc = h.in_ns(h.GW, *as_nobody, proto, dst, str(sport), str(h.TPROXY_PORT), check=False)
    assert proc.stdout.strip() == "refused", (proc.stdout, proc.stderr)
    lab.access.assert_no_flow(h.Flow(h.GW, proto, dst, sport, dst, h.TPROXY_PORT, "", 0))
