"""Named desired states for golden tests of the pure builders."""

from __future__ import annotations

from tproxy_service.cidrs import parse_cidrs, union
from tproxy_service.desired import RESERVED
from tproxy_service.model import AddressSet, DnsHijack, FailurePolicy, NftState, TproxySettings

USER = parse_cidrs(["198.51.100.128/25", "2001:db8:ffff::/48", "192.0.2.10"], "test")
LOCAL = parse_cidrs(["203.0.113.0/24", "10.77.0.0/24", "2001:db8:1::/64", "fd77::/64"], "test")


def _state(settings: TproxySettings, **kw: object) -> NftState:
    base: dict[str, object] = {
        "settings": settings,
        "bypass": union(RESERVED, USER),
        "lan_links": frozenset({"br-lan", "wlan0"}),
        "host_links": frozenset({"wlan0", "eth0"}),
        "local": LOCAL,
    }
    base.update(kw)
    return NftState(**base)  # type: ignore[arg-type]


SCENARIOS: dict[str, NftState] = {
    "default": _state(TproxySettings()),
    "ipv4_tcp_only": _state(TproxySettings(ipv6=False, udp=False)),
    "no_dns_hijack_custom_ports": _state(
        TproxySettings(port=7893, mark=0x2333, core_mark=0xFF00, dns_hijack=DnsHijack.OFF)
    ),
    "dns_hijack_lan": _state(TproxySettings(dns_hijack=DnsHijack.LAN)),
    "closed_policy": _state(TproxySettings(failure_policy=FailurePolicy.CLOSED)),
    "closed_ipv4_tcp_only": _state(TproxySettings(ipv6=False, udp=False, failure_policy=FailurePolicy.CLOSED)),
    "empty_sets": _state(
        TproxySettings(),
        bypass=AddressSet(),
        lan_links=frozenset(),
        host_links=frozenset(),
        local=AddressSet(),
    ),
}
