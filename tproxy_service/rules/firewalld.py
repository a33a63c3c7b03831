"""PURE: the one rule tproxyd keeps in firewalld's input chain, as libnftables JSON.

TPROXY delivers a diverted packet locally with its original destination, so firewalld's input
filtering judges it as traffic to the gateway and its zone rejects it. An accept in our own
table cannot override a reject in theirs, and firewalld 1.x's D-Bus API cannot name the packets
to admit: rich rules match no marks, and ipsets, zones and policies can only be created in the
permanent configuration. So, like OpenWrt's fw4 include, one rule `meta mark <ours> accept`
goes at the head of `inet firewalld filter_INPUT`, at runtime only. Only tproxyd's prerouting
sets that mark, and only on what it diverts; everything else still meets the zone's rules.
firewalld rebuilds its table on every reload and restart, so the daemon re-inserts it then.
"""

from __future__ import annotations

from typing import Any

TABLE = "firewalld"
INPUT_CHAIN = "filter_INPUT"
COMMENT = "tproxyd: admit diverted packets"

Json = dict[str, Any]
_CHAIN: Json = {"family": "inet", "table": TABLE, "name": INPUT_CHAIN}
_META: Json = {"metainfo": {"json_schema_version": 1}}


def build_list() -> Json:
    return {"nftables": [{"list": {"chain": _CHAIN}}]}


def _admits(rule: Json, mark: int) -> bool:
    return rule.get("expr") == _expr(mark)


def _expr(mark: int) -> list[Json]:
    return [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": mark}}, {"accept": None}]


def our_rules(listing: Json) -> list[Json]:
    """Our rules in a `list chain` answer (with handles), recognised by their comment."""
    rules = (item.get("rule") for item in listing.get("nftables", []))
    return [rule for rule in rules if rule and rule.get("comment") == COMMENT]


def build_sync(listing: Json, mark: int | None) -> Json | None:
    """The batch turning the listed chain into one that admits `mark` (None: admits nothing of
    ours), or None when it already does. Our rule goes first: before the zones' rejects."""
    ours = our_rules(listing)
    keep = [r for r in ours if mark is not None and _admits(r, mark)][:1]
    commands: list[Json] = [
        {"delete": {"rule": {"family": "inet", "table": TABLE, "chain": INPUT_CHAIN, "handle": r["handle"]}}}
        for r in ours
        if r not in keep
    ]
    if mark is not None and not keep:
        rule = {"family": "inet", "table": TABLE, "chain": INPUT_CHAIN, "comment": COMMENT, "expr": _expr(mark)}
        commands.append({"insert": {"rule": rule}})
    return {"nftables": [_META, *commands]} if commands else None
