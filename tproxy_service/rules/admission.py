"""PURE: the one rule tproxyd keeps in a host firewall's input chain, as libnftables JSON.

TPROXY delivers a diverted packet locally with its original destination, so a host firewall's
input filtering judges it as traffic to the gateway: firewalld's zone rejects it, ufw's INPUT
policy drops it. An accept in our own table cannot override a drop in theirs, and neither
front end can name these packets through its own interface: firewalld 1.x rich rules match no
marks (and its ipsets, zones and policies exist only in its permanent configuration), ufw knows
only its rule files. So, like OpenWrt's fw4 include, one rule `meta mark <ours> accept` goes at
the head of their input chain, at runtime only. Only tproxyd's prerouting sets that mark, and
only on what it diverts; everything else still meets the firewall's own rules. The expression is
the one iptables-nft writes for `-m mark --mark N -m comment --comment C -j ACCEPT`, so
iptables-save (which ufw reads) shows it as such. The firewalls rebuild these chains on every
reload and restart; the daemon re-inserts the rule then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COMMENT = "tproxyd: admit diverted packets"

Json = dict[str, Any]


@dataclass(frozen=True)
class FirewallChain:
    owner: str  # who builds the chain, for messages
    family: str
    table: str
    chain: str


FIREWALLD = FirewallChain("firewalld", "inet", "firewalld", "filter_INPUT")
UFW4 = FirewallChain("ufw", "ip", "filter", "ufw-before-input")
UFW6 = FirewallChain("ufw", "ip6", "filter", "ufw6-before-input")
INPUT_CHAINS = (FIREWALLD, UFW4, UFW6)

_META: Json = {"metainfo": {"json_schema_version": 1}}


def _ref(c: FirewallChain) -> Json:
    return {"family": c.family, "table": c.table, "chain": c.chain}


def build_list(c: FirewallChain) -> Json:
    return {"nftables": [{"list": {"chain": {"family": c.family, "table": c.table, "name": c.chain}}}]}


def _mark_match(mark: int) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": mark}}


def _admits(rule: Json, mark: int) -> bool:
    expr = rule.get("expr") or []
    return bool(expr) and expr[0] == _mark_match(mark) and expr[-1] == {"accept": None}


def our_rules(listing: Json) -> list[Json]:
    """Our rules in a `list chain` answer (with handles), recognised by their comment."""
    rules = (item.get("rule") for item in listing.get("nftables", []))
    return [rule for rule in rules if rule and rule.get("comment") == COMMENT]


def build_sync(c: FirewallChain, listing: Json, mark: int | None) -> Json | None:
    """The batch turning the listed chain into one that admits `mark` (None: admits nothing of
    ours), or None when it already does. Our rule goes first: before the firewall's drops."""
    ours = our_rules(listing)
    keep = [r for r in ours if mark is not None and _admits(r, mark)][:1]
    commands: list[Json] = [{"delete": {"rule": {**_ref(c), "handle": r["handle"]}}} for r in ours if r not in keep]
    if mark is not None and not keep:
        expr = [_mark_match(mark), {"counter": None}, {"accept": None}]
        commands.append({"insert": {"rule": {**_ref(c), "comment": COMMENT, "expr": expr}}})
    return {"nftables": [_META, *commands]} if commands else None


# --- Docker's FORWARD policy (read only: tproxyd never changes Docker's chains) ------------------

DOCKER_FORWARD = FirewallChain("Docker", "ip", "filter", "FORWARD")
DOCKER_USER = FirewallChain("Docker", "ip", "filter", "DOCKER-USER")


def chain_policy(listing: Json) -> str | None:
    chains = (item.get("chain") for item in listing.get("nftables", []))
    return next((c.get("policy") for c in chains if c), None)


def _accepts_on(listing: Json, key: str, ifname: str) -> bool:
    match = {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": ifname}}
    rules = (item.get("rule") for item in listing.get("nftables", []))
    return any(r and match in r.get("expr", []) and r["expr"][-1] == {"accept": None} for r in rules)


def forward_allowed(chains: tuple[Json, ...], ifname: str) -> bool:
    """The listed chains (DOCKER-USER, FORWARD) accept what `ifname` sends and what comes back
    to it (Docker's own rules do that for its bridges)."""
    return any(_accepts_on(c, "iifname", ifname) for c in chains) and any(
        _accepts_on(c, "oifname", ifname) for c in chains
    )


def docker_user_fix(ifname: str) -> str:
    return (
        f"iptables -I DOCKER-USER -i {ifname} -j ACCEPT && "
        f"iptables -I DOCKER-USER -o {ifname} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )


# --- what cannot work, and the one command that fixes it -----------------------------------------

# firewalld's iptables backend (FirewallBackend=iptables) builds this chain instead of its table.
FIREWALLD_IPTABLES = FirewallChain("firewalld", "ip", "filter", "INPUT_ZONES")
FIREWALLD_IPTABLES_PROBLEM = (
    "firewalld runs its iptables backend, whose input chain rejects diverted lan traffic; switch it to "
    "nftables: sed -i 's/^FirewallBackend=.*/FirewallBackend=nftables/' /etc/firewalld/firewalld.conf "
    "&& systemctl restart firewalld"
)


def docker_forward_problem(blocked: list[str]) -> str:
    return (
        f"Docker's FORWARD policy DROP drops what {', '.join(blocked)} sends direct (bypassed destinations); "
        f"allow it: {' && '.join(docker_user_fix(link) for link in blocked)}"
    )


def bridge_netfilter_problem(link: str, sysctls: list[str]) -> str:
    """br_netfilter (Docker turns it on) runs the inet hooks on a bridge's packets in the bridge
    layer; when the bridge then hands one up to IP, the kernel drops the socket tproxy assigned
    (ip_rcv orphans it) and skips the hooks, so nothing diverted on a bridge reaches the core."""
    return (
        f"{link} is a bridge and {' and '.join(sysctls)} = 1 (br_netfilter, which Docker enables), so the kernel "
        f"loses what tproxy diverts on it; turn that off: sysctl -w {' '.join(f'{c}=0' for c in sysctls)}"
    )
