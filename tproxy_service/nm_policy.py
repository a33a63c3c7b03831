"""PURE: the user's link choices + `[[networkmanager.auto]]` policies + NetworkManager facts ->
the links to proxy, each with its mode.

- A manual choice (`[links]`, EnableLink) always wins; its auto mode ("" over D-Bus) resolves to
  `lan` while the link's NetworkManager connection is shared (hotspot), else `host`.
- A link with no manual choice is proxied while a connection matching a policy is activating or
  active on it (first matching entry wins), and released when that connection goes away.
- A policy hold the user switched off with DisableLink (`suppressed`: (ifname, uuid) pairs) stays
  off until that connection leaves the link; the next activation applies the policy again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .model import AutoPolicy, LinkMode, NetworkManagerSettings, NmConnection, NmFacts

# NMDeviceType (NetworkManager's D-Bus API) -> the name a policy's `type` uses: nmcli's device
# TYPE column. nmcli shows a veth as "ethernet" (NM treats it as one), and so do we.
DEVICE_TYPES: dict[int, str] = {
    1: "ethernet",
    2: "wifi",
    5: "bt",
    6: "olpc-mesh",
    7: "wimax",
    8: "modem",
    9: "infiniband",
    10: "bond",
    11: "vlan",
    12: "adsl",
    13: "bridge",
    14: "generic",
    15: "team",
    16: "tun",
    17: "ip-tunnel",
    18: "macvlan",
    19: "vxlan",
    20: "ethernet",  # veth
    21: "macsec",
    22: "dummy",
    23: "ppp",
    24: "ovs-interface",
    25: "ovs-port",
    26: "ovs-bridge",
    27: "wpan",
    28: "6lowpan",
    29: "wireguard",
    30: "wifi-p2p",
    31: "vrf",
    32: "loopback",
    33: "hsr",
}
UNKNOWN_TYPE = "unknown"
# What a policy's `type` may name (loopback is never worth proxying).
POLICY_TYPES: frozenset[str] = frozenset(DEVICE_TYPES.values()) - {"loopback"}


@dataclass(frozen=True)
class PolicyHold:
    """Why a link is proxied without a manual choice."""

    mode: LinkMode
    connection: NmConnection
    entry: int  # its index in [[networkmanager.auto]] (0 = the first, as in config errors)


def matches(policy: AutoPolicy, conn: NmConnection) -> bool:
    """Every criterion the entry gives must hold (config.py guarantees at least one)."""
    return (
        (policy.id is None or policy.id == conn.id)
        and (policy.uuid is None or policy.uuid == conn.uuid.lower())
        and (policy.type is None or policy.type == conn.device_type)
        and (policy.shared is None or policy.shared == conn.shared)
    )


def shared_mode(conn: NmConnection | None) -> LinkMode:
    """Auto: a shared (hotspot) connection serves other hosts -> lan; anything else -> host."""
    return LinkMode.LAN if conn is not None and conn.shared else LinkMode.HOST


def policy_holds(
    settings: NetworkManagerSettings, nm: NmFacts, suppressed: frozenset[tuple[str, str]] = frozenset()
) -> dict[str, PolicyHold]:
    if not settings.enabled or not settings.auto:
        return {}
    holds: dict[str, PolicyHold] = {}
    for conn in sorted(nm.connections, key=lambda c: (c.ifname, c.uuid)):
        if conn.external or conn.ifname in holds or (conn.ifname, conn.uuid) in suppressed:
            continue
        for entry, policy in enumerate(settings.auto):
            if matches(policy, conn):
                holds[conn.ifname] = PolicyHold(policy.mode or shared_mode(conn), conn, entry)
                break
    return holds


def effective_links(
    manual: Mapping[str, LinkMode | None],
    settings: NetworkManagerSettings,
    nm: NmFacts,
    suppressed: frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, LinkMode]:
    """ifname -> mode of every link to proxy. `manual` maps a link to its mode, None = auto."""
    links = {name: hold.mode for name, hold in policy_holds(settings, nm, suppressed).items() if name not in manual}
    for name, mode in manual.items():
        if mode is None:
            mode = shared_mode(nm.connection_on(name)) if settings.enabled else LinkMode.HOST
        links[name] = mode
    return dict(sorted(links.items()))


def prune_suppressed(suppressed: frozenset[tuple[str, str]], nm: NmFacts) -> frozenset[tuple[str, str]]:
    """Forget a suppression once its connection is no longer on the link."""
    active = {(c.ifname, c.uuid) for c in nm.connections}
    return frozenset(s for s in suppressed if s in active)
