"""Golden tests of the pure nftables builder; every golden file also passes libnftables'
own JSON schema validation (the `nftables` module's json_validate)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from tproxy_service.cidrs import parse_cidrs
from tproxy_service.model import AddressSet, Interval, NftState
from tproxy_service.rules import nft as rules

from .scenarios import SCENARIOS

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("TPROXYD_REGEN_GOLDEN") == "1"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_replace_matches_golden(name: str) -> None:
    built = rules.build_replace(SCENARIOS[name])
    path = GOLDEN / f"{name}.json"
    if REGEN:
        path.write_text(json.dumps(built, indent=1, sort_keys=True) + "\n")
    assert built == json.loads(path.read_text()), f"{name}: builder output differs from {path}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_passes_libnftables_schema(name: str) -> None:
    nftables = pytest.importorskip("nftables", reason="Debian's python3-nftables is required")
    pytest.importorskip("jsonschema", reason="python3-jsonschema is required for schema validation")
    payload = json.loads((GOLDEN / f"{name}.json").read_text())
    assert nftables.Nftables().json_validate(payload)


def test_delete_is_idempotent_add_then_delete() -> None:
    commands = rules.build_delete()["nftables"]
    assert [next(iter(c)) for c in commands] == ["metainfo", "add", "delete"]


def test_replace_touches_only_our_table() -> None:
    for command in rules.build_replace(SCENARIOS["default"])["nftables"][1:]:
        ((_verb, obj),) = command.items()
        ((kind, body),) = obj.items()
        name = body["name"] if kind == "table" else body["table"]
        assert (body["family"], name) == ("inet", "tproxyd"), command


def _chain_rules(name: str, chain: str) -> list[list[dict[str, object]]]:
    built = rules.build_replace(SCENARIOS[name])["nftables"]
    return [
        c["add"]["rule"]["expr"] for c in built if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def _positions(exprs: list[str], *needles: str) -> list[int]:
    return [i for i, r in enumerate(exprs) if all(n in r for n in needles)]


def test_dns_exception_precedes_bypass_sets() -> None:
    """DNS to a local-subnet resolver must `return` (be proxied) before any bypass `accept`."""
    for name in ("default", "dns_hijack_lan"):
        exprs = [json.dumps(r) for r in _chain_rules(name, "bypass")]
        dns = _positions(exprs, '"dport"', "@local4")
        sets = [i for i, r in enumerate(exprs) if "@bypass4" in r or ("@local4" in r and "dport" not in r)]
        assert dns and max(dns) < min(sets), name
    assert not any('"dport"' in json.dumps(r) for r in _chain_rules("no_dns_hijack_custom_ports", "bypass"))


def test_dns_hijack_all_takes_lan_clients_dns_to_the_gateway_itself() -> None:
    """ "all": a lan client's port 53 to any address returns (proxied) before the `local` accept,
    and only after the core's mark and replies; "lan" and "off" leave local destinations alone."""
    exprs = [json.dumps(r) for r in _chain_rules("default", "bypass")]
    (lan_dns,) = _positions(exprs, "@lan_links", '"dport"', '"return"')
    (local,) = _positions(exprs, '"fib"', '"local"')
    assert 2 <= lan_dns < local
    assert "@local4" not in exprs[lan_dns] and "daddr" not in exprs[lan_dns]
    for name in ("dns_hijack_lan", "no_dns_hijack_custom_ports"):
        assert not any("@lan_links" in json.dumps(r) for r in _chain_rules(name, "bypass")), name


def test_loop_prevention_comes_first() -> None:
    first_two = [json.dumps(r) for r in _chain_rules("default", "bypass")[:2]]
    assert '"mark"' in first_two[0] and "255" in first_two[0]
    assert '"direction"' in first_two[1] and '"reply"' in first_two[1]


def test_ipv4_only_has_no_ipv6_tproxy_and_returns_ipv6_in_output() -> None:
    proxy = json.dumps(_chain_rules("ipv4_tcp_only", "proxy"))
    assert '"ip6"' not in proxy and '"udp"' not in proxy
    output = json.dumps(_chain_rules("ipv4_tcp_only", "output"))
    assert '"ipv6"' in output


def test_interval_elements_use_prefix_address_or_range() -> None:
    assert rules.interval_element(4, Interval(0xC0000200, 0xC00002FF)) == {"prefix": {"addr": "192.0.2.0", "len": 24}}
    assert rules.interval_element(4, Interval(0xC0000201, 0xC0000201)) == "192.0.2.1"
    assert rules.interval_element(4, Interval(0xC0000201, 0xC0000203)) == {"range": ["192.0.2.1", "192.0.2.3"]}


def test_element_changes_only_for_dynamic_sets() -> None:
    old = SCENARIOS["default"]
    new_local = parse_cidrs(["203.0.113.0/24", "10.77.0.0/24", "10.88.0.0/16", "2001:db8:1::/64"], "t")
    new = type(old)(old.settings, old.bypass, frozenset({"wlan0"}), old.host_links | {"usb0"}, new_local)
    changes = rules.element_changes(old, new)
    assert changes is not None
    by_set = {c.set_name: c for c in changes}
    assert set(by_set) == {"lan_links", "host_links", "local4", "local6"}
    lan = by_set["lan_links"]
    assert isinstance(lan, rules.IfnameChange) and lan.remove == ("br-lan",) and lan.add == ()
    local6 = by_set["local6"]
    assert isinstance(local6, rules.IntervalChange) and len(local6.remove) == 1 and local6.add == ()
    assert rules.element_changes(old, old) == []


def test_element_changes_none_when_skeleton_differs() -> None:
    old = SCENARIOS["default"]
    assert rules.element_changes(old, SCENARIOS["ipv4_tcp_only"]) is None
    other_bypass = type(old)(old.settings, AddressSet(), old.lan_links, old.host_links, old.local)
    assert rules.element_changes(old, other_bypass) is None


def test_schema_validation_rejects_a_malformed_document() -> None:
    """Negative control: the validator used above does reject documents outside the schema."""
    nftables = pytest.importorskip("nftables", reason="Debian's python3-nftables is required")
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        nftables.Nftables().json_validate({"nftables": "add table inet tproxyd"})


HOSTILE_NAMES = frozenset({"*", "@x", "eth*", "tcp", "\\", '"', "é" * 7 + "z"})


def test_interface_names_never_reach_libnftables() -> None:
    """libnftables reads JSON strings as expressions ('@x' a set reference, '*' the catch-all):
    the replace creates the link sets empty, and link_elements fills them over netlink."""
    state = dataclasses.replace(SCENARIOS["default"], lan_links=HOSTILE_NAMES, host_links=frozenset({"tcp", "eth0"}))
    for existing in (None, rules.TableObjects()):
        built = rules.build_replace(state, existing=existing)
        leaked = _strings(built) & (HOSTILE_NAMES - {"tcp"} | {"eth0"})  # "tcp" is in rules as a protocol
        assert not leaked, leaked
        link_sets = [
            c["add"]["set"] for c in built["nftables"] if c.get("add", {}).get("set", {}).get("type") == "ifname"
        ]
        assert [s["name"] for s in link_sets] == ["lan_links", "host_links"] and not any("elem" in s for s in link_sets)
    fill = rules.link_elements(state)
    assert fill == [
        rules.IfnameChange("lan_links", tuple(sorted(HOSTILE_NAMES)), (), flush=True),
        rules.IfnameChange("host_links", ("eth0", "tcp"), (), flush=True),
    ]


def _strings(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def test_replace_of_an_existing_table_keeps_only_the_link_sets() -> None:
    """In one transaction: every rule, every chain and every other set goes (whatever drift added),
    the link sets stay with their elements (a proxied link is never unproxied meanwhile)."""
    existing = rules.TableObjects(
        chains=frozenset({"prerouting", "proxy", "stray"}),
        sets=frozenset({"lan_links", "host_links", "bypass4", "junk"}),
        ifname_sets=frozenset({"lan_links"}),  # host_links was recreated with another type: it goes
    )
    commands = rules.build_replace(SCENARIOS["default"], existing=existing)["nftables"]
    head = [json.dumps(c, sort_keys=True) for c in commands[1:10]]
    table = '{"family": "inet", "name": "tproxyd"}'
    assert head[:2] == [f'{{"add": {{"table": {table}}}}}', f'{{"flush": {{"table": {table}}}}}']
    deleted = [(k, b["name"]) for c in commands if "delete" in c for k, b in c["delete"].items()]
    assert deleted == [
        ("chain", "prerouting"),
        ("chain", "proxy"),
        ("chain", "stray"),
        ("set", "bypass4"),
        ("set", "host_links"),
        ("set", "junk"),
    ]
    added_sets = {c["add"]["set"]["name"] for c in commands if "set" in c.get("add", {})}
    assert {"lan_links", "host_links", "bypass4", "bypass6", "local4", "local6"} == added_sets
    nftables = pytest.importorskip("nftables", reason="Debian's python3-nftables is required")
    pytest.importorskip("jsonschema", reason="python3-jsonschema is required for schema validation")
    assert nftables.Nftables().json_validate({"nftables": commands})


def test_bypassed_connections_set_and_test_only_their_ct_mark_bit() -> None:
    state = SCENARIOS["default"]
    custom = type(state)(
        dataclasses.replace(state.settings, bypass_ct_bit=5),
        state.bypass,
        state.lan_links,
        state.host_links,
        state.local,
    )
    for scenario, bit in ((state, 1 << 30), (custom, 1 << 5)):
        built = rules.build_replace(scenario)["nftables"]
        chains = {c["add"]["rule"]["chain"]: [] for c in built if "rule" in c.get("add", {})}
        for c in built:
            if "rule" in c.get("add", {}):
                chains[c["add"]["rule"]["chain"]].append(c["add"]["rule"]["expr"])
        ct_mark = {"ct": {"key": "mark"}}
        remembered = {"mangle": {"key": ct_mark, "value": {"|": [ct_mark, bit]}}}
        accepts = [r for r in chains["bypass"] if r[-1] == {"accept": None}]
        # Every destination-based accept remembers the connection; the core's mark and replies do not.
        assert [remembered in r for r in accepts] == [False, False, True, True, True, True, True]
        fast = {"match": {"op": "==", "left": {"&": [ct_mark, bit]}, "right": bit}}
        assert chains["prerouting"][0] == [fast, {"accept": None}]
        assert [fast, {"return": None}] in chains["output"]


def _with_bypass(cidrs: list[str]) -> NftState:
    return dataclasses.replace(SCENARIOS["default"], bypass=parse_cidrs(cidrs, "t"))


def test_a_changed_bypass_list_is_element_changes_of_the_bypass_sets() -> None:
    unchanged = [f"8.8.{i}.0/24" for i in range(0, 20, 2)]
    old = _with_bypass(["9.9.0.0/24", "9.9.2.0/24", "9.9.4.0/24", "2001:db8:a::/48", *unchanged])
    new = _with_bypass(["9.9.0.0/24", "9.9.2.0/23", "9.9.6.0/24", "2001:db8:b::/48", *unchanged])
    changes = rules.element_changes(old, new)
    assert changes is not None
    by_set = {c.set_name: c for c in changes}
    assert set(by_set) == {"bypass4", "bypass6"}
    v4 = by_set["bypass4"]
    assert isinstance(v4, rules.IntervalChange)
    assert v4.add == (Interval(0x09090200, 0x090903FF), Interval(0x09090600, 0x090906FF))
    assert v4.remove == (Interval(0x09090200, 0x090902FF), Interval(0x09090400, 0x090904FF))


def test_more_changed_intervals_than_the_new_list_holds_is_a_replace() -> None:
    """The limit is the new sets' size, counted over both families: at it, element changes;
    one past it, a replace (None)."""
    new = _with_bypass(["9.9.0.0/24", "9.9.2.0/24", "9.9.4.0/24", "9.9.6.0/24", "2001:db8:a::/48"])  # 5
    at_limit = _with_bypass(["9.9.0.0/24", "9.9.2.0/24", "9.9.8.0/24", "9.9.10.0/24"])  # 2 + 2 + 1 v6
    assert rules.element_changes(at_limit, new) is not None
    past = _with_bypass(["9.9.0.0/24", "9.9.2.0/24", "9.9.8.0/24", "9.9.10.0/24", "9.9.12.0/24"])  # 6
    assert rules.element_changes(past, new) is None
