"""PURE: config + choices + kernel facts -> the desired state of the kernel."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .cidrs import address_set, parse_cidr, parse_cidrs, union
from .model import (
    AddressFact,
    AddressSet,
    BypassSettings,
    Config,
    CoreStatus,
    DesiredState,
    Facts,
    FailurePolicy,
    Interval,
    LinkMode,
    NftState,
    RoutingState,
    ServiceState,
)
from .rules.reserved import RESERVED_V4, RESERVED_V6
from .rules.routing import build_routing

RESERVED: AddressSet = union(
    parse_cidrs(RESERVED_V4, "reserved IPv4"),
    parse_cidrs(RESERVED_V6, "reserved IPv6"),
)


def bypass_set(config: Config) -> AddressSet:
    """Static destinations never proxied: reserved ranges (optional) + the user's CIDRs and files."""
    return union(RESERVED, config.user_bypass) if config.bypass.reserved else config.user_bypass


def _connected(facts: Facts, settings: BypassSettings, sane: bool) -> list[AddressFact]:
    """Addresses on every link but loopback whose prefix is (`sane`) or is not as long as
    [bypass] local_min_prefix4/6 ask."""
    loopback = {link.index for link in facts.links if link.name == "lo"}
    return [
        addr
        for addr in facts.addresses
        if addr.link_index not in loopback
        and (addr.prefixlen >= (settings.local_min_prefix4 if addr.family == 4 else settings.local_min_prefix6)) == sane
    ]


def local_subnets(facts: Facts, settings: BypassSettings) -> AddressSet:
    """Directly connected subnets: the prefix of every address, unless it is too wide."""
    v4: list[Interval] = []
    v6: list[Interval] = []
    for addr in _connected(facts, settings, sane=True):
        family, network = parse_cidr(f"{addr.address}/{addr.prefixlen}")
        (v4 if family == 4 else v6).append(network)
    return address_set(v4, v6)


def too_wide_subnets(facts: Facts, settings: BypassSettings) -> tuple[str, ...]:
    """The connected prefixes `local_subnets` leaves out (proxied like any destination)."""
    return tuple(sorted({f"{a.address}/{a.prefixlen}" for a in _connected(facts, settings, sane=False)}))


def compute_desired(
    config: Config,
    links: Mapping[str, LinkMode],
    enabled: bool,
    facts: Facts,
    bypass: AddressSet,
    standby: bool = False,
) -> DesiredState:
    """Links are put in the sets whether or not they exist yet: the sets match by name, so a
    link that appears later is proxied from its first packet, with no race.

    `standby`: keep the table (and the core) with empty link sets when no link is proxied,
    because links are expected to come and go (NetworkManager policies): each would otherwise
    rebuild the whole table and start the core, and traffic would go direct meanwhile."""
    present = facts.link_names
    active = tuple(sorted(name for name in links if name in present))
    if not enabled or not (links or standby):
        return DesiredState(nft=None, routing=RoutingState(), active_links=())
    nft = NftState(
        settings=config.tproxy,
        bypass=bypass,
        lan_links=frozenset(n for n, m in links.items() if m.diverts_lan),
        host_links=frozenset(n for n, m in links.items() if m.diverts_host),
        local=local_subnets(facts, config.bypass) if config.bypass.local_subnets else AddressSet(),
    )
    return DesiredState(nft=nft, routing=build_routing(config.tproxy), active_links=active)


def apply_failure_policy(desired: DesiredState, core_ready: bool, policy: FailurePolicy) -> DesiredState:
    """Core not ready: "open" withdraws the diversion (traffic goes direct) by emptying the link
    sets, keeping table and routing so its return is an element update; "closed" keeps the
    diversion, and the proxy chain's final drop blocks what no core socket takes."""
    if desired.nft is None or core_ready or policy is FailurePolicy.CLOSED:
        return desired
    withdrawn = dataclasses.replace(desired.nft, lan_links=frozenset(), host_links=frozenset())
    return dataclasses.replace(desired, nft=withdrawn, active_links=())


def service_state(wanted: bool, core: CoreStatus, core_was_ready: bool, policy: FailurePolicy) -> ServiceState:
    """`starting` until the core has been ready once since proxying was wanted; after that a
    core outage is `degraded` (open: direct) or `blocked` (closed). An unreachable systemd
    manager is an outage from the start: the failure policy applies."""
    if not wanted:
        return ServiceState.OFF
    if core.ready:
        return ServiceState.ACTIVE
    if not core_was_ready and core.active_state != "unreachable":
        return ServiceState.STARTING
    return ServiceState.BLOCKED if policy is FailurePolicy.CLOSED else ServiceState.DEGRADED
