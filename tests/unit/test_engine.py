"""The reconcile engine against fake adapters: ordering, rollback, coalescing, idempotence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

import pytest

from tproxy_service.cidrs import parse_cidrs
from tproxy_service.control import Control
from tproxy_service.desired import local_subnets, too_wide_subnets
from tproxy_service.engine import Engine, EngineStatus
from tproxy_service.errors import KernelError
from tproxy_service.model import (
    AddressFact,
    BypassSettings,
    Config,
    CoreStatus,
    Facts,
    FailurePolicy,
    LinkChoice,
    LinkFact,
    LinkMode,
    NftState,
    RoutingState,
    ServiceState,
    TproxySettings,
)
from tproxy_service.rules.nft import SetChange
from tproxy_service.state_store import Choices, StateStore

from ..support import async_test


class FakeNft:
    def __init__(self) -> None:
        self.table: NftState | None = None
        self.calls: list[str] = []
        self.fail_replace = False
        self.fail_next_replace = False  # fails one replace only: a rollback after it succeeds
        self.fail_elements = False
        self.present = True

    async def exists(self) -> bool:
        return self.table is not None and self.present

    async def replace(self, state: NftState) -> None:
        self.calls.append("replace")
        if self.fail_replace or self.fail_next_replace:
            self.fail_next_replace = False
            raise KernelError("replace failed")
        self.table = state
        self.present = True

    async def update_elements(self, changes: list[SetChange]) -> None:
        self.calls.append("elements:" + ",".join(sorted(c.set_name for c in changes)))
        if self.fail_elements:
            raise KernelError("element update failed")
        assert self.table is not None

    async def delete(self) -> None:
        self.calls.append("delete")
        self.table = None


class FakeRouting:
    def __init__(self) -> None:
        self.installed: set[object] = set()
        self.calls: list[str] = []
        self.fail_ensure = False

    async def ensure(self, state: RoutingState) -> None:
        self.calls.append("ensure")
        if self.fail_ensure:
            raise KernelError("ip rule add failed")
        self.installed |= set(state.rules) | set(state.routes)

    async def remove(self, state: RoutingState) -> None:
        self.calls.append("remove")
        self.installed -= set(state.rules) | set(state.routes)


class FakeFacts:
    def __init__(self) -> None:
        self.facts = Facts(
            links=(LinkFact("lo", 1, True), LinkFact("eth0", 2, True)),
            addresses=(AddressFact(2, 4, "203.0.113.2", 24),),
        )
        self.reads = 0

    async def read(self) -> Facts:
        self.reads += 1
        await asyncio.sleep(0)
        return self.facts


@contextlib.asynccontextmanager
async def started(engine: Engine) -> AsyncIterator[EngineStatus]:
    """The engine's loop running and its startup pass done (its status is what `as` gets);
    stopped, its rules taken out, at the end of the block."""
    engine.start()
    yield await engine.reconcile("startup")
    await engine.stop()


def control_for(engine: Engine, store: StateStore, refreshed: list[str] | None = None) -> Control:
    """A Control on `engine` whose config is the engine's (a Reload re-applies it); `refreshed`
    records each NetworkManager refresh."""

    async def read_config() -> Config:
        return engine.config

    async def apply_config(config: Config) -> int:
        engine.set_config(config)
        return engine.request("reload")

    async def refresh() -> None:
        if refreshed is not None:
            refreshed.append("refresh")

    return Control(engine, store, read_config, apply_config, refresh)


@contextlib.asynccontextmanager
async def serving(control: Control, engine: Engine, remove: bool = True) -> AsyncIterator[None]:
    """As the daemon starts: the saved choices restored, then the engine's loop running (its first
    pass is whatever the block asks for); stopped at the end, with `remove` taking the rules out."""
    control.restore()
    engine.start()
    yield
    await engine.stop(remove=remove)


def choose(engine: Engine, links: Mapping[str, LinkMode | None]) -> int:
    """Tell the engine (as Control would) that exactly `links` are chosen; None is auto."""
    chosen = {name: LinkChoice.DISABLED for name in engine.config.link_defaults if name not in links}
    chosen |= {name: LinkChoice.of(mode) for name, mode in links.items()}
    intent = engine.intent
    return engine.want(replace(intent, choices=Choices(intent.choices.enabled, chosen)), "links changed")


def switch(engine: Engine, enabled: bool) -> int:
    intent = engine.intent
    return engine.want(replace(intent, choices=Choices(enabled, intent.choices.links)), "switched")


def configure(engine: Engine, config: Config) -> int:
    return engine.want(replace(engine.intent, config=config), "config changed")


def make(links: dict[str, LinkMode] | None = None) -> tuple[Engine, FakeNft, FakeRouting, FakeFacts]:
    nft, routing, facts = FakeNft(), FakeRouting(), FakeFacts()
    config = Config(link_defaults=links if links is not None else {"eth0": LinkMode.LAN})
    return Engine(config, nft, routing, facts), nft, routing, facts


@async_test
async def test_first_pass_replaces_and_routes() -> None:
    engine, nft, routing, _ = make()
    async with started(engine) as status:
        assert status.state is ServiceState.ACTIVE and status.active_links == ("eth0",)
        assert nft.calls == ["replace"] and routing.calls[0] == "ensure"
        assert nft.table is not None and nft.table.lan_links == {"eth0"}
        assert len(routing.installed) == 4  # rule + route, both families


@async_test
async def test_first_pass_with_nothing_configured_cleans_leftovers() -> None:
    engine, nft, routing, _ = make(links={})
    async with started(engine) as status:
        assert status.state is ServiceState.OFF
        assert nft.calls == ["delete"] and routing.calls == ["remove"]


@async_test
async def test_link_toggle_is_an_element_update_not_a_replace() -> None:
    engine, nft, routing, _ = make()
    async with started(engine):
        routing.calls.clear()
        await engine.wait_for(choose(engine, {"eth0": LinkMode.LAN, "wlan0": LinkMode.HOST}))
        assert nft.calls == ["replace", "elements:host_links"]
        assert routing.calls == []  # routing unchanged: not touched
        assert engine.status.active_links == ("eth0",)  # wlan0 configured but absent


@async_test
async def test_idempotent_pass_changes_nothing() -> None:
    engine, nft, routing, _ = make()
    async with started(engine):
        calls = (list(nft.calls), list(routing.calls))
        await engine.reconcile("again")
        await engine.wait_for(choose(engine, {"eth0": LinkMode.LAN}))
        assert (nft.calls, routing.calls) == calls


@async_test
async def test_burst_of_requests_coalesces() -> None:
    engine, _nft, _routing, facts = make()
    async with started(engine):
        before = engine.passes
        tickets = [engine.request(f"event {i}") for i in range(100)]
        await engine.wait_for(tickets[-1])
        assert engine.passes - before <= 2, "100 requests made while idle must coalesce into 1-2 passes"
        assert facts.reads == engine.passes


@async_test
async def test_new_address_updates_local_set_only() -> None:
    engine, nft, _routing, facts = make()
    async with started(engine):
        facts.facts = Facts(
            links=facts.facts.links,
            addresses=(*facts.facts.addresses, AddressFact(2, 6, "2001:db8:5::1", 64)),
        )
        await engine.reconcile("address added")
        assert nft.calls[-1] == "elements:local6"


@async_test
async def test_failed_element_update_falls_back_to_replace() -> None:
    engine, nft, _routing, _ = make()
    async with started(engine):
        nft.fail_elements = True
        status = await engine.wait_for(choose(engine, {"eth1": LinkMode.LAN}))
        assert nft.calls[-2:] == ["elements:lan_links", "replace"]
        assert status.state is ServiceState.ACTIVE
        assert nft.table is not None and nft.table.lan_links == {"eth1"}


@async_test
async def test_failed_routing_rolls_back_to_previous_state() -> None:
    engine, nft, routing, _ = make()
    async with started(engine):
        good_table, good_routes = nft.table, set(routing.installed)
        routing.fail_ensure = True
        # A config change that needs new routing (other table): ensure fails -> rollback.
        bad = Config(link_defaults={"eth0": LinkMode.LAN}, tproxy=type(engine.config.tproxy)(route_table=200))
        status = await engine.wait_for(configure(engine, bad))
        assert status.state is ServiceState.FAILED and "ip rule add failed" in status.last_error
        assert nft.table == good_table
        routing.fail_ensure = False
        assert routing.installed == good_routes


@async_test
async def test_failed_replace_reports_and_keeps_previous() -> None:
    engine, nft, _routing, _ = make()
    async with started(engine):
        good = nft.table
        nft.fail_replace = True
        bad = Config(link_defaults={"eth0": LinkMode.LAN}, tproxy=type(engine.config.tproxy)(port=999))
        status = await engine.wait_for(configure(engine, bad))
        assert status.state is ServiceState.FAILED and status.last_error == "replace failed"
        assert nft.table is good
        nft.fail_replace = False
        status = await engine.reconcile("retry")
        assert status.state is ServiceState.ACTIVE and nft.table is not None and nft.table.settings.port == 999


@async_test
async def test_clean_rollback_restores_previous_state_and_keeps_the_cache() -> None:
    """The failing step fails once: the rollback itself succeeds (the tests above keep the fault
    during the rollback, so they only see "the rollback failed too")."""
    engine, nft, routing, _ = make()
    async with started(engine):
        good_config, good_table, good_routes = engine.config, nft.table, set(routing.installed)
        # New routing table and port: the routing is switched first, then the table replace fails.
        bad = Config(link_defaults={"eth0": LinkMode.LAN}, tproxy=TproxySettings(port=999, route_table=200))
        nft.fail_next_replace = True
        status = await engine.wait_for(configure(engine, bad))
        assert status.state is ServiceState.FAILED and status.last_error == "replace failed"
        assert nft.calls == ["replace", "replace", "replace"], "startup, the failed one, the rollback's"
        assert nft.table is good_table
        assert routing.installed == good_routes, "table 200's rules and routes removed, table 100's back"
        # A clean rollback keeps the engine's record of what is applied: going back to the old
        # config is a pass with nothing to do (after a failed rollback it would rebuild everything).
        nft_calls, routing_calls = list(nft.calls), list(routing.calls)
        status = await engine.wait_for(configure(engine, good_config))
        assert status.state is ServiceState.ACTIVE
        assert (nft.calls, routing.calls) == (nft_calls, routing_calls)


@async_test
async def test_drift_forces_replace_and_reapply_checks_table() -> None:
    engine, nft, routing, _ = make()
    async with started(engine):
        await engine.wait_for(engine.request("someone deleted it", nft_drift=True))
        assert nft.calls[-1] == "replace"
        nft.present = False  # deleted behind our back, no event seen
        routing.installed.clear()
        await engine.wait_for(engine.reapply())
        assert nft.calls[-1] == "replace" and nft.present
        assert len(routing.installed) == 4


@async_test
async def test_disable_removes_everything_and_stop_cleans_up() -> None:
    engine, nft, routing, _ = make()
    async with started(engine):
        status = await engine.wait_for(switch(engine, False))
        assert status.state is ServiceState.OFF and nft.table is None and not routing.installed
        await engine.wait_for(switch(engine, True))
        assert nft.table is not None
    assert nft.table is None and not routing.installed


@async_test
async def test_listener_sees_status_changes() -> None:
    engine, _nft, _routing, _ = make()
    seen: list[ServiceState] = []
    engine.add_listener(lambda s: seen.append(s.state))
    async with started(engine):
        await engine.wait_for(switch(engine, False))
        assert seen == [ServiceState.ACTIVE, ServiceState.OFF]


@pytest.mark.parametrize("mode", list(LinkMode))
@async_test
async def test_modes_fill_the_right_sets(mode: LinkMode) -> None:
    engine, nft, _routing, _ = make(links={"eth0": mode})
    async with started(engine):
        assert nft.table is not None
        assert ("eth0" in nft.table.lan_links) == (mode in (LinkMode.LAN, LinkMode.BOTH))
        assert ("eth0" in nft.table.host_links) == (mode in (LinkMode.HOST, LinkMode.BOTH))


class FakeCore:
    def __init__(self) -> None:
        self.status = CoreStatus(active_state="inactive", ready=False)
        self.wants: list[bool] = []

    async def want(self, run: bool) -> None:
        self.wants.append(run)


def make_with_a_core(policy: FailurePolicy) -> tuple[Engine, FakeNft, FakeCore]:
    nft, routing, facts, core = FakeNft(), FakeRouting(), FakeFacts(), FakeCore()
    config = Config(link_defaults={"eth0": LinkMode.BOTH}, tproxy=TproxySettings(failure_policy=policy))
    return Engine(config, nft, routing, facts, core), nft, core


@async_test
async def test_core_lifecycle_open_policy() -> None:
    engine, nft, core = make_with_a_core(FailurePolicy.OPEN)
    async with started(engine) as status:
        assert core.wants[-1] is True
        assert status.state is ServiceState.STARTING and status.core_state == "inactive"
        assert nft.table is not None and not nft.table.lan_links, "no diversion before the core listens"
        core.status = CoreStatus(active_state="active", ready=True)
        status = await engine.reconcile("core ready")
        assert status.state is ServiceState.ACTIVE and status.active_links == ("eth0",)
        assert nft.calls == ["replace", "elements:host_links,lan_links"], "core up/down is an element update"
        refused = "nothing listens on tcp/IPv4 port 12345"
        core.status = CoreStatus(active_state="failed", ready=False, detail=refused)
        status = await engine.reconcile("core failed")
        assert status.state is ServiceState.DEGRADED and "nothing listens" in status.last_error
        assert status.active_links == () and nft.calls[-1] == "elements:host_links,lan_links"
        await engine.wait_for(switch(engine, False))
        assert core.wants[-1] is False and engine.status.state is ServiceState.OFF


@async_test
async def test_core_outage_closed_policy_keeps_diversion() -> None:
    engine, nft, core = make_with_a_core(FailurePolicy.CLOSED)
    engine.start()
    core.status = CoreStatus(active_state="active", ready=True)
    assert (await engine.reconcile("startup")).state is ServiceState.ACTIVE
    core.status = CoreStatus(active_state="activating", ready=False, detail="restarting")
    status = await engine.reconcile("core died")
    assert status.state is ServiceState.BLOCKED and status.active_links == ("eth0",)
    assert nft.calls == ["replace"], "closed: the diversion (and its final drop) stays in place"
    await engine.stop()


class FakeFirewall:
    def __init__(self, problem: str | None = None) -> None:
        self.marks: list[int | None] = []
        self.problem = problem

    async def admit(self, mark: int, lan_links: frozenset[str]) -> str | None:
        self.marks.append(mark if lan_links else None)
        return self.problem if lan_links else None


@async_test
async def test_host_firewalls_admit_our_mark_only_while_a_lan_link_is_proxied() -> None:
    nft, routing, facts, firewall = FakeNft(), FakeRouting(), FakeFacts(), FakeFirewall()
    engine = Engine(Config(link_defaults={"eth0": LinkMode.LAN}), nft, routing, facts, firewalls=(firewall,))
    async with started(engine):
        assert firewall.marks == [TproxySettings().mark]
        await engine.wait_for(choose(engine, {"eth0": LinkMode.HOST}))  # host mode re-enters via lo
        assert firewall.marks[-1] is None
        await engine.wait_for(choose(engine, {"eth0": LinkMode.LAN}))
        assert firewall.marks[-1] == TproxySettings().mark
    assert firewall.marks[-1] is None, "stopping must take our rule out of the firewalls"


@async_test
async def test_a_firewall_that_cannot_admit_degrades_with_its_reason() -> None:
    firewall = FakeFirewall("firewalld runs its iptables backend; run: X")
    engine = Engine(
        Config(link_defaults={"eth0": LinkMode.LAN}), FakeNft(), FakeRouting(), FakeFacts(), firewalls=(firewall,)
    )
    async with started(engine) as status:
        assert status.state is ServiceState.DEGRADED
        assert status.last_error == "firewalld runs its iptables backend; run: X"


@async_test
async def test_arm_blocks_before_the_core_is_asked_and_the_first_pass_keeps_it() -> None:
    engine, nft, core = make_with_a_core(FailurePolicy.CLOSED)
    await engine.arm()  # before the loop runs: no core job, the table with its final drop
    assert nft.calls == ["replace"] and core.wants == []
    assert nft.table is not None and nft.table.lan_links == frozenset({"eth0"})
    async with started(engine) as status:
        assert status.state is ServiceState.STARTING and nft.calls == ["replace"], "taken over, not rebuilt"


WIDE_FACTS = Facts(
    links=(LinkFact("lo", 1, True), LinkFact("eth0", 2, True)),
    addresses=(
        AddressFact(1, 4, "127.0.0.1", 8),  # loopback: never
        AddressFact(2, 4, "203.0.113.2", 24),
        AddressFact(2, 4, "130.0.0.1", 1),  # a hostile DHCP server's /1
        AddressFact(2, 4, "10.9.0.1", 16),  # exactly the limit: kept
        AddressFact(2, 6, "2001:db8::1", 32),
        AddressFact(2, 6, "2001:db8:7::1", 48),
    ),
)


def test_too_wide_connected_prefixes_are_not_bypassed() -> None:
    """A hostile DHCP /1 must not make half of IPv4 direct: prefixes wider than
    [bypass] local_min_prefix4/6 (default /16, /48) stay out of the local sets."""
    default = BypassSettings()
    assert local_subnets(WIDE_FACTS, default) == parse_cidrs(["203.0.113.0/24", "10.9.0.0/16", "2001:db8:7::/48"], "t")
    assert too_wide_subnets(WIDE_FACTS, default) == ("130.0.0.1/1", "2001:db8::1/32")
    anything = BypassSettings(local_min_prefix4=0, local_min_prefix6=0)
    assert local_subnets(WIDE_FACTS, anything).v4 == parse_cidrs(["10.9.0.0/16", "128.0.0.0/1"], "t").v4
    assert too_wide_subnets(WIDE_FACTS, anything) == ()


@async_test
async def test_too_wide_connected_prefixes_are_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    engine, _nft, _routing, facts = make()
    facts.facts = WIDE_FACTS
    with caplog.at_level(logging.WARNING):
        async with started(engine):
            await engine.reconcile("again")
            configure(engine, Config(link_defaults={"eth0": LinkMode.LAN}, bypass=BypassSettings(local_min_prefix4=1)))
            await engine.reconcile("config")
    warnings = [r.getMessage() for r in caplog.records if "not bypassing connected prefixes" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "130.0.0.1/1, 2001:db8::1/32" in warnings[0] and "/16 (IPv4) or /48 (IPv6)" in warnings[0]
    assert "130.0.0.1/1" not in warnings[1] and "2001:db8::1/32" in warnings[1]
