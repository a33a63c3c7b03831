"""Kernel adapters against the real kernel: libnftables replace, netlink element updates (and
their interplay), pyroute2 policy routing, the nf_tables drift watch, the facts reader."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
from collections.abc import Sequence

import pytest

from tproxy_service.cidrs import parse_cidrs, union
from tproxy_service.desired import RESERVED
from tproxy_service.errors import KernelError
from tproxy_service.kernel.facts import FactsReader
from tproxy_service.kernel.nft import NftablesAdapter
from tproxy_service.kernel.nft_netlink import SetElementWriter, table_exists
from tproxy_service.kernel.routing import RoutingAdapter
from tproxy_service.model import AddressSet, Interval, NftState, RouteSpec, RuleSpec, TproxySettings
from tproxy_service.monitors.nft_events import NftDriftWatch
from tproxy_service.rules.nft import IfnameChange, IntervalChange, build_replace, element_changes, link_elements
from tproxy_service.rules.routing import build_routing

from ..support import foreign_tables, wait_until, wait_until_async
from ..unit.scenarios import SCENARIOS
from .netns import run_in_netns, sh

pytestmark = pytest.mark.root


OTHER_TABLES = foreign_tables("eth9")


def _elements(set_name: str) -> list[object]:
    data = json.loads(sh(f"nft -j list set inet tproxyd {set_name}"))
    (found,) = [item["set"] for item in data["nftables"] if "set" in item]
    return list(found.get("elem", []))


def _contains(set_name: str, element: str) -> bool:
    return sh(f"nft get element inet tproxyd {set_name} '{{ {element} }}'", check=False) != ""


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_golden_scenario_loads_into_the_kernel(name: str) -> None:
    def body() -> None:
        adapter = NftablesAdapter()
        asyncio.run(adapter.replace(SCENARIOS[name]))
        asyncio.run(adapter.replace(SCENARIOS[name]))  # idempotent: still one table
        assert sh("nft list tables").splitlines() == ["table inet tproxyd"]
        listed = sh("nft list table inet tproxyd")
        assert "tproxy ip to 127.0.0.1" in listed
        asyncio.run(adapter.delete())
        asyncio.run(adapter.delete())  # idempotent
        assert sh("nft list tables") == ""
        adapter.close()

    run_in_netns(body)


def test_replace_leaves_other_tables_byte_identical() -> None:
    def body() -> None:
        sh("nft -f - <<'EOF'\n" + OTHER_TABLES + "EOF")
        before = sh("nft list table ip nat") + sh("nft list table inet filter")
        adapter = NftablesAdapter()
        asyncio.run(adapter.replace(SCENARIOS["default"]))
        asyncio.run(adapter.replace(SCENARIOS["ipv4_tcp_only"]))
        asyncio.run(adapter.delete())
        assert sh("nft list table ip nat") + sh("nft list table inet filter") == before
        adapter.close()

    run_in_netns(body)


def test_netlink_element_updates_interoperate_with_libnftables() -> None:
    """Elements written by libnftables can be deleted over netlink and vice versa."""

    def body() -> None:
        adapter = NftablesAdapter()
        asyncio.run(adapter.replace(SCENARIOS["default"]))  # local4 has 203.0.113.0/24 from libnftables
        writer = SetElementWriter("tproxyd")
        (old,) = [iv for iv in parse_cidrs(["203.0.113.0/24"], "t").v4]
        new = parse_cidrs(["198.51.100.64/26", "255.255.255.0/24"], "t").v4  # second one reaches the top
        writer.apply([IntervalChange("local4", 4, new, (old,))])
        assert not _contains("local4", "203.0.113.9")
        assert _contains("local4", "198.51.100.70") and _contains("local4", "255.255.255.255")
        assert not _contains("local4", "198.51.100.1")
        writer.apply([IntervalChange("local4", 4, (), new)])
        assert not _contains("local4", "198.51.100.70") and not _contains("local4", "255.255.255.1")
        v6 = parse_cidrs(["2001:db8:9::/48"], "t").v6
        writer.apply([IntervalChange("local6", 6, v6, ())])
        assert _contains("local6", "2001:db8:9::1")
        writer.apply([IfnameChange("lan_links", ("veth-new",), ("br-lan",))])
        names = _elements("lan_links")
        assert "veth-new" in names and "br-lan" not in names and "wlan0" in names
        # An element added over netlink is gone after a libnftables replace with the desired state.
        asyncio.run(adapter.replace(SCENARIOS["default"]))
        assert "veth-new" not in _elements("lan_links")
        adapter.close()

    run_in_netns(body)


def _in(intervals: Sequence[Interval], address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    value = int.from_bytes(socket.inet_pton(family, address), "big")
    return any(iv.first <= value <= iv.last for iv in intervals)


def _diff_equals_a_replace(old: NftState, new: NftState, probes: list[str]) -> None:
    """In a test namespace: `old` loaded, the element changes to `new` applied; then every probe
    address is in the bypass sets exactly when `new` has it, and `nft` lists the sets as after a
    full replace with `new`."""

    def listing() -> str:
        return sh("nft list set inet tproxyd bypass4") + sh("nft list set inet tproxyd bypass6")

    def body() -> None:
        adapter = NftablesAdapter()
        asyncio.run(adapter.replace(old))
        changes = element_changes(old, new)
        assert changes is not None, "a small change of the bypass list must not need a full replace"
        assert {c.set_name for c in changes} <= {"bypass4", "bypass6"}
        SetElementWriter("tproxyd").apply(changes)
        diffed = listing()
        for address in probes:
            in_set = "bypass6" if ":" in address else "bypass4"
            expected = _in(new.bypass.v6 if ":" in address else new.bypass.v4, address)
            assert _contains(in_set, address) == expected, address
        asyncio.run(adapter.replace(new))
        assert diffed == listing()
        adapter.close()

    run_in_netns(body)


def test_a_changed_bypass_list_is_applied_as_element_changes_equal_to_a_replace() -> None:
    """A Reload of a changed list (some entries gone, some new, one grown from the same start,
    one merged with its neighbour, an IPv6 one) is a diff of the bypass sets, and the kernel then
    holds exactly what a full replace of the new state would: listed the same, same lookups."""
    old_user = parse_cidrs(["198.51.100.0/26", "203.0.113.0/25", "9.9.9.0/24", "2001:db8:aa::/48"], "t")
    new_user = parse_cidrs(
        ["198.51.100.0/25", "203.0.113.128/25", "9.9.9.0/24", "9.9.10.0/24", "2001:db8:bb::/48"], "t"
    )
    old = dataclasses.replace(SCENARIOS["default"], bypass=union(RESERVED, old_user))
    new = dataclasses.replace(SCENARIOS["default"], bypass=union(RESERVED, new_user))
    added, gone = ["198.51.100.100", "203.0.113.200", "9.9.10.1", "2001:db8:bb::1"], ["203.0.113.1", "2001:db8:aa::1"]
    assert all(_in(new.bypass.v6 if ":" in a else new.bypass.v4, a) for a in added)
    assert not any(_in(new.bypass.v6 if ":" in a else new.bypass.v4, a) for a in gone)
    _diff_equals_a_replace(old, new, [*added, *gone, "9.9.9.9", "9.9.11.1"])


@pytest.mark.parametrize(
    ("old_cidrs", "new_cidrs"),
    [
        # reserved = false: the set no longer starts at 0.0.0.0 (a replace writes an interval end
        # at 0 then), and the last interval grows to reach the top of the address space
        (["0.0.0.0/24", "198.51.100.0/24", "255.255.255.0/24", "::/120"], ["1.0.0.0/24", "255.255.254.0/23"]),
        # the other way: the first interval now starts at 0, the last one no longer reaches the top
        (["1.0.0.0/24", "255.255.254.0/23", "2001:db8::/48"], ["0.0.0.0/23", "255.255.254.0/24", "::/120"]),
    ],
)
def test_bypass_changes_at_the_ends_of_the_address_space_equal_a_replace(
    old_cidrs: list[str], new_cidrs: list[str]
) -> None:
    unchanged = [f"9.9.{i}.0/24" for i in range(0, 100, 2)] + ["2001:db8:77::/48"]  # not a wholesale change
    old = dataclasses.replace(SCENARIOS["default"], bypass=parse_cidrs(old_cidrs + unchanged, "t"))
    new = dataclasses.replace(SCENARIOS["default"], bypass=parse_cidrs(new_cidrs + unchanged, "t"))
    probes = ["0.0.0.0", "0.0.1.1", "1.0.0.1", "255.255.255.255", "255.255.254.1", "198.51.100.1", "::1", "::"]
    _diff_equals_a_replace(old, new, probes)


def test_element_update_errors_are_atomic_and_reported() -> None:
    def body() -> None:
        asyncio.run(NftablesAdapter().replace(SCENARIOS["default"]))
        writer = SetElementWriter("tproxyd")
        with pytest.raises(KernelError, match="No such file or directory"):
            writer.apply([IfnameChange("lan_links", ("added-first",), ()), IfnameChange("no_such_set", ("x",), ())])
        assert "added-first" not in _elements("lan_links"), "a failed batch must change nothing"
        sh("nft delete table inet tproxyd")
        with pytest.raises(KernelError):
            writer.apply([IfnameChange("lan_links", ("x",), ())])
        assert not table_exists("tproxyd")

    run_in_netns(body)


def test_routing_ensure_exactly_once_and_remove_all() -> None:
    def body() -> None:
        state = build_routing(TproxySettings())
        # Leftovers of crashed runs (or of `ip rule add` run twice): same mark and table.
        sh("ip rule add fwmark 1 lookup 100")
        sh("ip rule add fwmark 1 lookup 100")
        sh("ip rule add fwmark 1 lookup 100 priority 10100")

        async def scenario() -> None:  # one event loop: the adapter keeps its netlink socket
            routing = RoutingAdapter()
            await routing.ensure(state)
            await routing.ensure(state)
            counts = await routing.count(state)
            assert counts[RuleSpec(4, 1, 100, 10100)] == 1 and counts[RuleSpec(6, 1, 100, 10100)] == 1
            assert counts[RouteSpec(4, 100)] == 1 and counts[RouteSpec(6, 100)] == 1
            assert sh("ip rule").count("fwmark 0x1 lookup 100") == 1, sh("ip rule")
            assert "local default dev lo" in sh("ip route show table 100")
            assert "local default dev lo" in sh("ip -6 route show table 100")
            await routing.remove(state)
            await routing.remove(state)  # tolerant of nothing to remove
            routing.close()

        asyncio.run(scenario())
        assert "fwmark" not in sh("ip rule") + sh("ip -6 rule")
        assert sh("ip route show table 100") + sh("ip -6 route show table 100") == ""

    run_in_netns(body)


def test_drift_watch_reports_others_not_us() -> None:
    def body() -> None:
        async def scenario() -> None:
            seen: list[str] = []
            watch = NftDriftWatch("tproxyd", seen.append)
            adapter = NftablesAdapter(watch=watch)
            watch.start()
            await adapter.replace(SCENARIOS["default"])
            await adapter.update_elements([IfnameChange("lan_links", ("ours0",), ())])
            # Events reach the watch in commit order: if ours were taken for drift, their reports
            # would come before the one for this outside change, so it must be the only report.
            nft = await asyncio.create_subprocess_exec("nft", "delete", "table", "inet", "tproxyd")
            await nft.wait()
            await wait_until_async(lambda: seen, 10, "the drift watch's report")
            assert seen == [f"table changed by pid {nft.pid}"], f"expected one report, for nft: {seen}"
            watch.pause()
            adapter.close()

        asyncio.run(scenario())

    run_in_netns(body)


def test_facts_reader_sees_links_and_addresses() -> None:
    def body() -> None:
        sh("ip link add tpk-a type veth peer name tpk-b")
        sh("ip addr add 198.51.100.1/25 dev tpk-a && ip -6 addr add 2001:db8:7::1/64 dev tpk-a nodad")
        facts = asyncio.run(FactsReader().read())
        assert {"lo", "tpk-a", "tpk-b"} <= facts.link_names
        addrs = {(a.address, a.prefixlen) for a in facts.addresses}
        assert ("198.51.100.1", 25) in addrs and ("2001:db8:7::1", 64) in addrs

    run_in_netns(body)


def test_standby_table_loads_empty_and_takes_a_link_as_an_element() -> None:
    """The standby table (NetworkManager policies armed, no link proxied yet): every set is empty
    in the kernel, and a link arriving later is an element update into it, not a rebuild."""

    def body() -> None:
        async def scenario() -> None:  # one event loop: the adapter keeps its netlink socket
            adapter = NftablesAdapter()
            await adapter.replace(SCENARIOS["empty_sets"])
            for name in ("lan_links", "host_links", "bypass4", "bypass6", "local4", "local6"):
                assert _elements(name) == [], f"{name} should be empty"
            await adapter.update_elements([IfnameChange("lan_links", ("wlan9",), ())])
            assert _elements("lan_links") == ["wlan9"] and _elements("host_links") == []
            await adapter.delete()
            adapter.close()

        asyncio.run(scenario())


HOSTILE_NAMES = frozenset({"*", "@x", "eth*", "tcp", "\\", '"', "é" * 7 + "z"})  # the last: 15 bytes


def _udp_packets_arriving(link: str) -> int:
    listed = sh("nft -j list chain inet tpk_probe prerouting")
    rules = [item["rule"] for item in json.loads(listed)["nftables"] if "rule" in item]
    counters = [e["counter"]["packets"] for r in rules for e in r["expr"] if "counter" in e]
    assert len(counters) == 1, listed
    return int(counters[0])


def test_replace_takes_interface_names_literally() -> None:
    """'*' must not become the catch-all element, '@x' a set reference, 'eth*' a wildcard: after
    a fresh replace and a replace of the existing table, the link sets hold exactly these names,
    and a packet arriving on (and leaving by) another link is neither diverted nor dropped."""

    def body() -> None:
        sh("ip link add tpk-a type veth peer name tpk-b && ip link set tpk-a up && ip link set tpk-b up")
        sh("ip addr add 198.51.100.1/30 dev tpk-a && ip route add 192.0.2.0/24 dev tpk-a")
        mac = json.loads(sh("ip -j link show tpk-b"))[0]["address"]
        sh(f"ip neigh add 192.0.2.7 lladdr {mac} dev tpk-a nud permanent")  # no one answers ARP for it
        sh("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.tpk-b.rp_filter=0")
        # Counts what reaches tpk-b's prerouting after ours (priority 0 comes after -150).
        sh(
            "nft add table inet tpk_probe && nft add chain inet tpk_probe prerouting "
            "'{ type filter hook prerouting priority 0; }' && "
            "nft add rule inet tpk_probe prerouting iifname tpk-b udp dport 9 counter"
        )
        state = dataclasses.replace(
            SCENARIOS["closed_policy"],  # what the core does not take is dropped: a catch-all would show
            bypass=AddressSet(),
            local=AddressSet(),
            lan_links=HOSTILE_NAMES,
            host_links=HOSTILE_NAMES,
        )
        adapter = NftablesAdapter()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for attempt in range(1, 3):  # a fresh table, then the existing one replaced
                asyncio.run(adapter.replace(state))
                for set_name in ("lan_links", "host_links"):
                    assert sorted(map(str, _elements(set_name))) == sorted(HOSTILE_NAMES), sh("nft list ruleset")
                udp.sendto(b"probe", ("192.0.2.7", 9))
                wait_until(lambda n=attempt: _udp_packets_arriving("tpk-b") == n, 5, "the probe to arrive direct")
        assert "packets 0 " in sh("nft list chain inet tproxyd proxy"), "nothing was diverted and dropped"
        adapter.close()

    run_in_netns(body)


def _listing_of_builder_json(state: object) -> str:
    """What `nft` makes of the rule builder's JSON (libnftables), the links added over netlink."""
    import nftables  # the reference: libnftables itself

    rc, _out, error = nftables.Nftables().json_cmd(build_replace(state))  # type: ignore[arg-type]
    assert rc == 0, error
    writer = SetElementWriter("tproxyd")
    writer.apply(link_elements(state))  # type: ignore[arg-type]
    writer.close()
    listed = sh("nft list table inet tproxyd")
    sh("nft delete table inet tproxyd")
    return listed


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_netlink_replace_builds_what_libnftables_builds_from_the_json(name: str) -> None:
    """The netlink batch is a translation of the builder's JSON: `nft` lists both the same,
    for a fresh table and for a replace of an existing one."""

    def body() -> None:
        expected = _listing_of_builder_json(SCENARIOS[name])
        adapter = NftablesAdapter()
        for _ in range(2):
            asyncio.run(adapter.replace(SCENARIOS[name]))
            assert sh("nft list table inet tproxyd") == expected
        adapter.close()

    run_in_netns(body)


def test_replace_and_delete_need_no_libnftables() -> None:
    def body() -> None:
        import sys

        sys.modules["nftables"] = None  # type: ignore[assignment]  # importing it now fails
        adapter = NftablesAdapter()
        asyncio.run(adapter.replace(SCENARIOS["default"]))
        assert "tproxy ip to 127.0.0.1" in sh("nft list table inet tproxyd")
        asyncio.run(adapter.delete())
        assert sh("nft list tables") == ""
        adapter.close()

    run_in_netns(body)


def test_a_failing_replace_changes_nothing() -> None:
    """Skeleton, bypass sets and link elements go in one kernel transaction: when any part is
    refused (here a link name longer than the kernel's IFNAMSIZ), the kernel rolls all of it
    back and the table stays exactly as it was."""

    def body() -> None:
        adapter = NftablesAdapter()
        asyncio.run(adapter.replace(SCENARIOS["default"]))
        before = sh("nft list table inet tproxyd")
        broken = dataclasses.replace(
            SCENARIOS["closed_policy"],
            bypass=parse_cidrs(["198.18.0.0/15"], "t"),
            lan_links=frozenset({"x" * 17}),
        )
        with pytest.raises(KernelError, match="Invalid argument"):
            asyncio.run(adapter.replace(broken))
        assert sh("nft list table inet tproxyd") == before
        asyncio.run(adapter.replace(SCENARIOS["closed_policy"]))  # and the next one works
        assert "postrouting" in sh("nft list table inet tproxyd")
        adapter.close()

    run_in_netns(body)


def _conntrack_marks(dport: int) -> list[int]:
    listed = sh(f"conntrack -L -p udp --dport {dport} 2>/dev/null", check=False)
    return [int(m) for m in re.findall(r"\bmark=(\d+)", listed)]


def test_bypassed_connections_carry_only_their_ct_mark_bit() -> None:
    """A connection to a bypassed destination gets the configured ct mark bit once, OR-ed into
    the mark another ruleset set (that one's bits stay); a proxied one does not get it."""

    def body() -> None:
        sh("ip link add tpk-a type veth peer name tpk-b && ip link set tpk-a up && ip link set tpk-b up")
        sh("ip addr add 198.51.100.1/30 dev tpk-a && ip route add 192.0.2.0/24 dev tpk-a")
        sh("ip route add 203.0.113.0/24 dev tpk-a")
        mac = json.loads(sh("ip -j link show tpk-b"))[0]["address"]
        for peer in ("192.0.2.7", "203.0.113.7"):
            sh(f"ip neigh add {peer} lladdr {mac} dev tpk-a nud permanent")
        # Another user of ct mark, before us in output: bit 0.
        sh(
            "nft add table inet tpk_other && nft add chain inet tpk_other output "
            "'{ type route hook output priority -200; }' && "
            "nft add rule inet tpk_other output udp dport 9 ct mark set ct mark or 0x1"
        )
        settings = dataclasses.replace(TproxySettings(), bypass_ct_bit=20)
        state = dataclasses.replace(
            SCENARIOS["default"],
            settings=settings,
            bypass=parse_cidrs(["192.0.2.0/24"], "t"),
            local=AddressSet(),
            host_links=frozenset({"tpk-a"}),
        )
        adapter = NftablesAdapter()
        asyncio.run(adapter.replace(state))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for _ in range(3):
                udp.sendto(b"bypassed", ("192.0.2.7", 9))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.sendto(b"proxied", ("203.0.113.7", 9))
        wait_until(lambda: len(_conntrack_marks(9)) == 2, 5, "both connections in conntrack")
        listed = sh("conntrack -L -p udp --dport 9 2>/dev/null")
        bypassed = [int(m) for m in re.findall(r"dst=192\.0\.2\.7 .*?\bmark=(\d+)", listed)]
        proxied = [int(m) for m in re.findall(r"dst=203\.0\.113\.7 .*?\bmark=(\d+)", listed)]
        assert bypassed == [1 << 20 | 1], listed
        assert proxied == [1], listed
        adapter.close()

    run_in_netns(body)
