"""PURE: desired nftables state -> libnftables JSON, and element-level diffs.

Everything lives in one table, `inet tproxyd`. Chains:

  prerouting (filter hook, priority filter + 20): packets of established transparent sockets are diverted
      (mark + accept); traffic arriving on a lan link, and the host's own marked traffic
      re-entering via lo, jumps to `proxy`.
  proxy: `jump bypass`, then tproxy to the core (IPv4 on 127.0.0.1, IPv6 on [::1]) with the mark.
  output (route hook, mangle priority): the host's own traffic leaving via a host link: `jump bypass`, then the
      mark, which makes the kernel re-route it via `local default dev lo` back into prerouting.
  bypass: `accept` = never proxied (core's own mark, replies, local/broadcast/multicast
      destinations, bypass sets, directly connected subnets); `return` = proxy it. The DNS
      exceptions (`dns_hijack`) return first: "lan" for DNS to connected subnets, "all" also for
      a lan client's DNS to any address, this gateway's own included.
  postrouting (filter hook, failure_policy closed only): drops our marked packets about to leave
      by a host link. The re-route missed them: a socket bound to the link (SO_BINDTODEVICE,
      `curl --interface LINK`) only matches routes through that link, not `dev lo`.
  guard (input hook): direct connections to the core's tproxy port are rejected (see
      _guard_rules).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..cidrs import BITS, packed_diff, prefix_len, to_address
from ..model import DnsHijack, FailurePolicy, Interval, NftState, PackedIntervals, TproxySettings

FAMILY = "inet"
TABLE = "tproxyd"
SET_LAN_LINKS = "lan_links"
SET_HOST_LINKS = "host_links"
LINK_SETS = (SET_LAN_LINKS, SET_HOST_LINKS)
SET_BYPASS4 = "bypass4"
SET_BYPASS6 = "bypass6"
SET_LOCAL4 = "local4"
SET_LOCAL6 = "local6"
CHAIN_PREROUTING = "prerouting"
CHAIN_PROXY = "proxy"
CHAIN_OUTPUT = "output"
CHAIN_POSTROUTING = "postrouting"
CHAIN_BYPASS = "bypass"
CHAIN_GUARD = "guard"
MANGLE_PRIORITY = -150
# After a host firewall's reverse-path filter at filter + 10 (firewalld's IPv6_rpfilter): it looks
# the source up in the routing table our mark selects (a local default route) and drops every
# marked IPv6 packet. Unmarked it passes; routing, which tproxy needs before it, comes later.
PREROUTING_PRIORITY = 20
DNS_PORT = 53

Json = dict[str, Any]


# --- expression helpers (libnftables JSON schema, version 1) -------------------------------------


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _set_ref(name: str) -> str:
    return "@" + name


def _mark_set(mark: int) -> Json:
    return {"mangle": {"key": _meta("mark"), "value": mark}}


def _ct_mark() -> Json:
    return {"ct": {"key": "mark"}}


def _bypassed_connection(s: TproxySettings) -> list[Json]:
    """Accept, and remember the connection as bypassed in its ct mark bit (only that bit: the
    rest of ct mark is left to other users), so its later packets take the fast path."""
    bit = 1 << s.bypass_ct_bit
    return [{"mangle": {"key": _ct_mark(), "value": {"|": [_ct_mark(), bit]}}}, _ACCEPT]


def _known_bypassed(s: TproxySettings) -> Json:
    bit = 1 << s.bypass_ct_bit
    return _match({"&": [_ct_mark(), bit]}, bit)


_ACCEPT: Json = {"accept": None}
_RETURN: Json = {"return": None}


def _jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


def _l4protos(settings: TproxySettings) -> list[Json]:
    """Only TCP (and UDP when enabled) is ever diverted; IPv6 only when enabled."""
    protos: Any = {"set": ["tcp", "udp"]} if settings.udp else "tcp"
    exprs = [_match(_meta("l4proto"), protos)]
    if not settings.ipv6:
        exprs.insert(0, _match(_meta("nfproto"), "ipv4"))
    return exprs


def _diverted(settings: TproxySettings) -> list[Json]:
    """What jumps to `proxy`. Under `closed` every TCP and UDP packet: the proxy chain drops what
    it cannot divert (IPv6 with ipv6 = false, UDP with udp = false) unless bypassed."""
    if settings.failure_policy is FailurePolicy.CLOSED:
        return [_match(_meta("l4proto"), {"set": ["tcp", "udp"]})]
    return _l4protos(settings)


# --- element encoding ---------------------------------------------------------------------------


def interval_element(family: int, iv: Interval) -> Any:
    plen = prefix_len(family, iv)
    if plen == BITS[family]:
        return to_address(family, iv.first)
    if plen is not None:
        return {"prefix": {"addr": to_address(family, iv.first), "len": plen}}
    return {"range": [to_address(family, iv.first), to_address(family, iv.last)]}


def _set(name: str, key_type: str, elements: list[Any], interval: bool) -> Json:
    body: Json = {"family": FAMILY, "table": TABLE, "name": name, "type": key_type}
    if interval:
        body["flags"] = ["interval"]
    if elements:
        body["elem"] = elements
    return {"add": {"set": body}}


def _chain(name: str, hook: str | None = None, chain_type: str = "filter", prio: int = MANGLE_PRIORITY) -> Json:
    body: Json = {"family": FAMILY, "table": TABLE, "name": name}
    if hook:
        body.update({"type": chain_type, "hook": hook, "prio": prio, "policy": "accept"})
    return {"add": {"chain": body}}


def _rule(chain: str, *exprs: Json) -> Json:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(exprs)}}}


# --- chains -------------------------------------------------------------------------------------


def _bypass_rules(s: TproxySettings) -> list[Json]:
    rules = [
        _rule(CHAIN_BYPASS, _match(_meta("mark"), s.core_mark), _ACCEPT),
        _rule(CHAIN_BYPASS, _match({"ct": {"key": "direction"}}, "reply"), _ACCEPT),
    ]
    if s.dns_hijack is DnsHijack.ALL:
        # A lan client's DNS to any address, this gateway's own resolver included, goes to the
        # core: before the `local` accept below. The gateway's own DNS never comes from a lan link.
        rules.append(
            _rule(
                CHAIN_BYPASS,
                _match(_meta("iifname"), _set_ref(SET_LAN_LINKS)),
                _match(_payload("th", "dport"), DNS_PORT),
                _RETURN,
            )
        )
    rules.append(
        _rule(
            CHAIN_BYPASS,
            _match(
                {"fib": {"result": "type", "flags": ["daddr"]}},
                {"set": ["local", "broadcast", "multicast"]},
            ),
            *_bypassed_connection(s),
        )
    )
    if s.dns_hijack is not DnsHijack.OFF:  # DNS to a directly connected resolver is still proxied (no DNS leak)
        for proto, local_set in (("ip", SET_LOCAL4), ("ip6", SET_LOCAL6)):
            rules.append(
                _rule(
                    CHAIN_BYPASS,
                    _match(_payload("th", "dport"), DNS_PORT),
                    _match(_payload(proto, "daddr"), _set_ref(local_set)),
                    _RETURN,
                )
            )
    for proto, name in (("ip", SET_BYPASS4), ("ip6", SET_BYPASS6), ("ip", SET_LOCAL4), ("ip6", SET_LOCAL6)):
        rules.append(_rule(CHAIN_BYPASS, _match(_payload(proto, "daddr"), _set_ref(name)), *_bypassed_connection(s)))
    return rules


def _prerouting_rules(s: TproxySettings) -> list[Json]:
    return [
        # Fast path: a connection the bypass chain accepted before (and its replies), whatever link.
        _rule(CHAIN_PREROUTING, _known_bypassed(s), _ACCEPT),
        # Established proxied flows from lan links: straight to the core's transparent socket.
        # Only on lan links: a socket lookup for every packet of every other link (say, the
        # upstream's replies) would tax traffic that is never diverted.
        _rule(
            CHAIN_PREROUTING,
            _match(_meta("iifname"), _set_ref(SET_LAN_LINKS)),
            *_l4protos(s),
            _match({"socket": {"key": "transparent"}}, 1),
            _mark_set(s.mark),
            _ACCEPT,
        ),
        _rule(
            CHAIN_PREROUTING,
            _match(_meta("iifname"), _set_ref(SET_LAN_LINKS)),
            *_diverted(s),
            _jump(CHAIN_PROXY),
        ),
        # The host's own traffic, marked in `output` and routed to lo by the fwmark rule.
        _rule(
            CHAIN_PREROUTING,
            _match(_meta("iifname"), "lo"),
            _match(_meta("mark"), s.mark),
            *_l4protos(s),
            _jump(CHAIN_PROXY),
        ),
    ]


def _proxy_rules(s: TproxySettings) -> list[Json]:
    rules = [_rule(CHAIN_PROXY, _jump(CHAIN_BYPASS))]
    closed = s.failure_policy is FailurePolicy.CLOSED
    families = [("ipv4", "ip", "127.0.0.1")] + ([("ipv6", "ip6", "::1")] if s.ipv6 else [])
    for nfproto, family, addr in families:
        rules.append(
            _rule(
                CHAIN_PROXY,
                _match(_meta("nfproto"), nfproto),
                *_l4protos(s)[-1:],  # tproxy needs the transport protocol matched in its rule
                _mark_set(s.mark),
                {"tproxy": {"family": family, "addr": addr, "port": s.port}},
                _ACCEPT,
            )
        )
    if closed:  # failure_policy closed: what no core socket took is dropped, never forwarded direct
        rules.append(_rule(CHAIN_PROXY, {"counter": None}, {"drop": None}))
    return rules


def _output_rules(s: TproxySettings) -> list[Json]:
    # In a base chain `return` means "policy accept": the packet leaves unmarked (direct).
    closed = s.failure_policy is FailurePolicy.CLOSED
    protos: Any = {"set": ["tcp", "udp"]} if s.udp or closed else "tcp"
    rules = [
        _rule(CHAIN_OUTPUT, _match(_meta("oifname"), _set_ref(SET_HOST_LINKS), "!="), _RETURN),
        _rule(CHAIN_OUTPUT, _match(_meta("l4proto"), protos, "!="), _RETURN),
    ]
    if not s.ipv6 and not closed:
        rules.append(_rule(CHAIN_OUTPUT, _match(_meta("nfproto"), "ipv6"), _RETURN))
    rules.append(_rule(CHAIN_OUTPUT, _known_bypassed(s), _RETURN))  # fast path, as in prerouting
    rules.append(_rule(CHAIN_OUTPUT, _jump(CHAIN_BYPASS)))
    # closed: what is not bypassed and cannot be diverted is dropped, never sent direct
    if not s.ipv6 and closed:
        rules.append(_rule(CHAIN_OUTPUT, _match(_meta("nfproto"), "ipv6"), {"counter": None}, {"drop": None}))
    if not s.udp and closed:
        rules.append(_rule(CHAIN_OUTPUT, _match(_meta("l4proto"), "udp"), {"counter": None}, {"drop": None}))
    return [*rules, _rule(CHAIN_OUTPUT, _mark_set(s.mark))]


def _postrouting_rules(s: TproxySettings) -> list[Json]:
    marked_leaving = (_match(_meta("mark"), s.mark), _match(_meta("oifname"), _set_ref(SET_HOST_LINKS)))
    return [_rule(CHAIN_POSTROUTING, *marked_leaving, {"counter": None}, {"drop": None})]


def _guard_rules(s: TproxySettings) -> list[Json]:
    """Diverted packets keep their original (remote) destination, so a packet to 127.0.0.1 or
    ::1 on the tproxy port is a direct connection: the core would take the port itself as the
    destination and connect to it, again and again (a loop any local user can start), or, with
    sniffing, connect wherever the Host header says (a proxy for local users). Refused here."""
    rules = []
    for family, addr in (("ip", "127.0.0.1"), ("ip6", "::1")):
        for proto, verdict in (("tcp", {"reject": {"type": "tcp reset"}}), ("udp", {"reject": None})):
            rules.append(
                _rule(
                    CHAIN_GUARD,
                    _match(_payload(family, "daddr"), addr),
                    _match(_meta("l4proto"), proto),
                    _match(_payload(proto, "dport"), s.port),
                    verdict,
                )
            )
    return rules


def encode_intervals(family: int, intervals: Sequence[Interval]) -> list[Any]:
    return [interval_element(family, iv) for iv in intervals]


@dataclass(frozen=True)
class TableObjects:
    """The chains and named sets an existing table inet tproxyd holds, read just before a replace.
    `ifname_sets`: those of `sets` keyed by interface name (the link sets are kept if among them)."""

    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()
    ifname_sets: frozenset[str] = frozenset()


def _delete(kind: str, name: str) -> Json:
    return {"delete": {kind: {"family": FAMILY, "table": TABLE, "name": name}}}


def _clear_table(existing: TableObjects | None) -> list[Json]:
    """Empty our table but for the link sets and their elements (see build_replace)."""
    table = {"table": {"family": FAMILY, "name": TABLE}}
    if existing is None:  # none seen: create-or-keep, delete, recreate (one appearing meanwhile goes too)
        return [{"add": table}, {"delete": table}, {"add": table}]
    keep = existing.ifname_sets & set(LINK_SETS)
    return [
        {"add": table},
        {"flush": table},  # every rule: nothing references the chains and sets any more
        *(_delete("chain", name) for name in sorted(existing.chains)),
        *(_delete("set", name) for name in sorted(existing.sets - keep)),
    ]


def build_replace(
    state: NftState,
    bypass_elements: tuple[list[Any], list[Any]] | None = None,
    existing: TableObjects | None = None,
) -> Json:
    """One atomic transaction that rebuilds our table as `state`, except the link sets' elements.

    Interface names never go into libnftables JSON: it reads a string as an expression ('@x' a
    set reference, '*' the catch-all element, 'eth*' a wildcard, 'tcp' a constant). The link sets
    are created empty, or, in an `existing` table, kept with their elements, so a link proxied
    before stays proxied throughout; `link_elements(state)` then sets them over netlink.
    `bypass_elements` = (v4, v6) from `encode_intervals` of `state.bypass`, when the caller has
    them already (encoding 100k entries costs ~0.3 s; they change only with the config)."""
    bypass4, bypass6 = bypass_elements or (encode_intervals(4, state.bypass.v4), encode_intervals(6, state.bypass.v6))
    s = state.settings
    commands: list[Json] = [
        {"metainfo": {"json_schema_version": 1}},
        *_clear_table(existing),
        _set(SET_LAN_LINKS, "ifname", [], interval=False),
        _set(SET_HOST_LINKS, "ifname", [], interval=False),
        _set(SET_BYPASS4, "ipv4_addr", bypass4, True),
        _set(SET_BYPASS6, "ipv6_addr", bypass6, True),
        _set(SET_LOCAL4, "ipv4_addr", encode_intervals(4, state.local.v4), True),
        _set(SET_LOCAL6, "ipv6_addr", encode_intervals(6, state.local.v6), True),
        _chain(CHAIN_BYPASS),
        _chain(CHAIN_PROXY),
        _chain(CHAIN_PREROUTING, hook="prerouting", prio=PREROUTING_PRIORITY),
        _chain(CHAIN_OUTPUT, hook="output", chain_type="route"),
        _chain(CHAIN_GUARD, hook="input"),
    ]
    commands += _bypass_rules(s) + _proxy_rules(s) + _prerouting_rules(s) + _output_rules(s) + _guard_rules(s)
    if s.failure_policy is FailurePolicy.CLOSED:
        commands += [_chain(CHAIN_POSTROUTING, hook="postrouting"), *_postrouting_rules(s)]
    return {"nftables": commands}


def build_delete() -> Json:
    """Idempotent removal of our table (add-then-delete never fails on a missing table)."""
    table = {"table": {"family": FAMILY, "name": TABLE}}
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, {"add": table}, {"delete": table}]}


# --- element-level diffs ------------------------------------------------------------------------


@dataclass(frozen=True)
class IfnameChange:
    """`flush`: empty the set first (in the same kernel transaction as the additions)."""

    set_name: str
    add: tuple[str, ...]
    remove: tuple[str, ...]
    flush: bool = False


@dataclass(frozen=True)
class IntervalChange:
    set_name: str
    family: int
    add: tuple[Interval, ...]
    remove: tuple[Interval, ...]


SetChange = IfnameChange | IntervalChange


def _ifname_change(name: str, old: frozenset[str], new: frozenset[str]) -> list[SetChange]:
    if old == new:
        return []
    return [IfnameChange(name, tuple(sorted(new - old)), tuple(sorted(old - new)))]


def _interval_changes(
    sets: list[tuple[str, int, Sequence[Interval], Sequence[Interval]]], limit: int
) -> list[SetChange] | None:
    """(set name, family, old, new) -> the changes of the sets that differ; None once more than
    `limit` intervals changed in all."""
    changes: list[SetChange] = []
    for name, family, old, new in sets:
        if old != new:
            width = BITS[family] // 8
            diff = packed_diff(PackedIntervals.pack(width, old), PackedIntervals.pack(width, new), limit)
            if diff is None:
                return None
            added, removed = diff
            limit -= len(added) + len(removed)
            changes.append(IntervalChange(name, family, added, removed))
    return changes


def link_elements(state: NftState) -> list[SetChange]:
    """After a replace: the link sets hold exactly `state`'s names (one netlink transaction, so a
    name in both the old and the new set is never missing)."""
    return [
        IfnameChange(SET_LAN_LINKS, tuple(sorted(state.lan_links)), (), flush=True),
        IfnameChange(SET_HOST_LINKS, tuple(sorted(state.host_links)), (), flush=True),
    ]


def element_changes(old: NftState, new: NftState) -> list[SetChange] | None:
    """The set-element changes turning `old` into `new`, or None when a full replace is needed:
    the settings (chains and rules) differ, or the bypass sets changed so much that writing them
    anew costs the kernel less (a changed interval is one delete and one insert; a replace is
    one insert per interval of the new sets)."""
    if old.settings != new.settings:
        return None
    bypass = _interval_changes(
        [(SET_BYPASS4, 4, old.bypass.v4, new.bypass.v4), (SET_BYPASS6, 6, old.bypass.v6, new.bypass.v6)],
        len(new.bypass.v4) + len(new.bypass.v6),
    )
    if bypass is None:
        return None
    local = _interval_changes(
        [(SET_LOCAL4, 4, old.local.v4, new.local.v4), (SET_LOCAL6, 6, old.local.v6, new.local.v6)], sys.maxsize
    )
    assert local is not None
    links = _ifname_change(SET_LAN_LINKS, old.lan_links, new.lan_links)
    host_links = _ifname_change(SET_HOST_LINKS, old.host_links, new.host_links)
    return links + host_links + local + bypass
