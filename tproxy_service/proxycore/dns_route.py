"""PURE: tproxyd's DNS route in the core config, and the warnings about the core's DNS.

DNS that `dns_hijack` sends to the core must be answered by the core's own `dns` section, not
forwarded to the resolver it was addressed to (the gateway's dnsmasq, the LAN's router: the leak).
So, unless the user's config routes port 53 from tproxyd's inbounds itself, tproxyd adds a `dns`
outbound (it gets the core mark like every outbound) and, first among the routing rules, a rule
sending port 53 from its tproxy inbounds there. v2ray's `dns` outbound answers A/AAAA queries from
the `dns` section and forwards other types to the original destination."""

from __future__ import annotations

import copy
from typing import Any

from ..errors import ConfigError
from ..model import DnsHijack, TproxySettings
from .v2ray_ports import port_ranges

DNS_OUTBOUND_TAG = "tproxyd-dns"
DNS_PORT = 53
# A config without a `dns` section would resolve through the system resolver, unmarked: on a
# gateway that is the leak dns_hijack is for, and with a host link it loops back into the core.
# These are queried through the first outbound (usually the proxy), with the core mark.
DEFAULT_DNS: dict[str, Any] = {"servers": ["1.1.1.1", "8.8.8.8"]}


def _covers_dns_port(spec: Any) -> bool:
    return any(lo <= DNS_PORT <= hi for lo, hi in port_ranges(spec))


def _rules(config: dict[str, Any]) -> list[Any]:
    routing = config.get("routing")
    rules = routing.get("rules") if isinstance(routing, dict) else None
    return rules if isinstance(rules, list) else []


def routes_dns(config: dict[str, Any], inbound_tags: list[str]) -> bool:
    """Does a routing rule of the user's already decide where port 53 from our inbounds goes:
    one matching port 53 or sending to a `dns` outbound, not limited to other inbounds?"""
    dns_outbounds = {
        o.get("tag") for o in config.get("outbounds", []) if isinstance(o, dict) and o.get("protocol") == "dns"
    }
    for rule in _rules(config):
        if not isinstance(rule, dict):
            continue
        inbounds = rule.get("inboundTag")
        if inbounds is not None and not any(
            tag in inbound_tags for tag in (inbounds if isinstance(inbounds, list) else [inbounds])
        ):
            continue
        if _covers_dns_port(rule.get("port")) or rule.get("outboundTag") in dns_outbounds:
            return True
    return False


def wants_dns_route(user: dict[str, Any] | None, settings: TproxySettings, inbound_tags: list[str]) -> bool:
    return settings.dns_hijack is not DnsHijack.OFF and not (user is not None and routes_dns(user, inbound_tags))


def add_dns_route(config: dict[str, Any], settings: TproxySettings, inbound_tags: list[str], source: str) -> None:
    """Add tproxyd's DNS route to `config` (the merged copy) when it wants one."""
    if not wants_dns_route(config, settings, inbound_tags):
        return
    outbounds = config["outbounds"]
    for i, outbound in enumerate(outbounds):
        if isinstance(outbound, dict) and outbound.get("tag") == DNS_OUTBOUND_TAG:
            raise ConfigError(f"{source}: outbounds[{i}] uses the tag {DNS_OUTBOUND_TAG!r}, which tproxyd reserves")
    routing = config.setdefault("routing", {})
    rules = routing.setdefault("rules", []) if isinstance(routing, dict) else None
    if not isinstance(rules, list):
        raise ConfigError(f"{source}: routing.rules must be a JSON array")
    rules.insert(0, {"type": "field", "inboundTag": inbound_tags, "port": DNS_PORT, "outboundTag": DNS_OUTBOUND_TAG})
    outbounds.append({"tag": DNS_OUTBOUND_TAG, "protocol": "dns"})  # the caller marks every outbound
    if config.get("dns") is None:
        config["dns"] = copy.deepcopy(DEFAULT_DNS)


def dns_warnings(user: dict[str, Any] | None, settings: TproxySettings, inbound_tags: list[str]) -> tuple[str, ...]:
    """What to tell the admin about the core's DNS (None = the built-in config: nothing)."""
    if user is None or not wants_dns_route(user, settings, inbound_tags):
        return ()
    dns = user.get("dns")
    if dns is None:
        defaults = ", ".join(DEFAULT_DNS["servers"])
        return (
            f"the core config has no dns section, so tproxyd gives it one: DNS the clients send is answered "
            f"through {defaults} (via the first outbound); name your own servers in its dns section",
        )
    servers = dns.get("servers") if isinstance(dns, dict) else None
    own = [s for s in servers or [] if (s.get("address") if isinstance(s, dict) else s) != "localhost"]
    if not own:
        return (
            "the core config's dns section names no DNS servers of its own, so the core resolves through "
            "the system resolver: that may be the leak you wanted to avoid, and with a host link it loops",
        )
    return ()
