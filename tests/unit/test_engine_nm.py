"""The engine and Control with NetworkManager facts (fake adapters): a connection coming or
going is a set-element update, never a table rebuild; DisableLink of a policy-held link; Reapply
re-reads NetworkManager first."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tproxy_service.control import Control
from tproxy_service.engine import Engine
from tproxy_service.model import (
    AutoPolicy,
    Config,
    LinkChoice,
    LinkFact,
    LinkMode,
    NetworkManagerSettings,
    NmConnection,
    NmFacts,
    ServiceState,
)
from tproxy_service.state_store import StateStore

from ..support import async_test
from .test_engine import FakeFacts, FakeNft, FakeRouting, control_for, serving, started

CAFE = NmConnection("wlan0", "wifi", "Cafe", "11111111-1111-1111-1111-111111111111", shared=False)
HOTSPOT = NmConnection("wlan0", "wifi", "Hotspot", "22222222-2222-2222-2222-222222222222", shared=True)
POLICIES = NetworkManagerSettings(auto=(AutoPolicy(LinkMode.HOST, id="Cafe"), AutoPolicy(None, shared=True)))


def make(tmp_path: Path) -> tuple[Engine, Control, FakeNft]:
    nft, facts = FakeNft(), FakeFacts()
    facts.facts = dataclasses.replace(facts.facts, links=(*facts.facts.links, LinkFact("wlan0", 3, True)))
    engine = Engine(Config(networkmanager=POLICIES), nft, FakeRouting(), facts)
    return engine, control_for(engine, StateStore(tmp_path)), nft


def up(*connections: NmConnection) -> NmFacts:
    return NmFacts(running=True, connections=connections)


@async_test
async def test_connections_coming_and_going_are_element_updates(tmp_path: Path) -> None:
    engine, control, nft = make(tmp_path)
    async with started(engine) as status:
        # Policies configured: the table is armed with empty link sets, so a connection never
        # costs a rebuild.
        assert nft.calls == ["replace"] and nft.table is not None and not nft.table.host_links
        assert status.state is ServiceState.ACTIVE and status.active_links == ()

        status = await engine.wait_for(control.set_network(up(CAFE), "cafe up"))
        assert status.active_links == ("wlan0",)
        status = await engine.wait_for(control.set_network(up(), "cafe down"))
        assert status.active_links == ()
        status = await engine.wait_for(control.set_network(up(HOTSPOT), "hotspot up"))
        assert status.active_links == ("wlan0",) and engine.proxied_links == {"wlan0": LinkMode.LAN}
        assert nft.calls == ["replace", "elements:host_links", "elements:host_links", "elements:lan_links"]
        # The same facts again: no kernel work at all.
        await engine.wait_for(control.set_network(up(HOTSPOT), "again"))
        assert len(nft.calls) == 4


@async_test
async def test_without_policies_or_links_there_is_no_table() -> None:
    nft = FakeNft()
    engine = Engine(Config(), nft, FakeRouting(), FakeFacts())
    async with started(engine) as status:
        assert status.state is ServiceState.OFF and nft.table is None


@async_test
async def test_auto_choice_follows_the_connection_on_the_link(tmp_path: Path) -> None:
    engine, control, nft = make(tmp_path)
    async with serving(control, engine):
        await control.enable_link("wlan0", LinkChoice.AUTO)
        assert engine.proxied_links == {"wlan0": LinkMode.HOST}
        await engine.wait_for(control.set_network(up(HOTSPOT), "hotspot up"))
        assert engine.proxied_links == {"wlan0": LinkMode.LAN}
        assert nft.calls[-1] == "elements:host_links,lan_links"  # moved from one set to the other


@async_test
async def test_disable_of_a_policy_link_lasts_until_its_connection_leaves(tmp_path: Path) -> None:
    engine, control, _nft = make(tmp_path)
    async with serving(control, engine):
        await engine.wait_for(control.set_network(up(CAFE), "cafe up"))
        assert engine.status.active_links == ("wlan0",)
        assert control.link_choices == {}  # `Links` shows manual choices only

        await control.disable_link("wlan0")
        assert engine.status.active_links == () and "wlan0" not in engine.proxied_links
        assert not (tmp_path / "state.json").exists()  # nothing to save: not a choice, a pause

        await engine.wait_for(control.set_network(up(CAFE), "a signal that changes nothing"))
        assert engine.status.active_links == ()
        await engine.wait_for(control.set_network(up(), "cafe down"))
        await engine.wait_for(control.set_network(up(CAFE), "cafe up again"))
        assert engine.status.active_links == ("wlan0",)


@async_test
async def test_manual_choice_stays_when_its_connection_leaves(tmp_path: Path) -> None:
    engine, control, _nft = make(tmp_path)
    async with serving(control, engine):
        await engine.wait_for(control.set_network(up(CAFE), "cafe up"))
        await control.enable_link("wlan0", LinkChoice.BOTH)
        await engine.wait_for(control.set_network(up(), "cafe down"))
        assert engine.proxied_links == {"wlan0": LinkMode.BOTH} and control.link_choices == {"wlan0": "both"}


@async_test
async def test_reapply_refreshes_networkmanager_facts_first(tmp_path: Path) -> None:
    engine, _control, _nft = make(tmp_path)
    refreshed: list[str] = []
    control = control_for(engine, StateStore(tmp_path), refreshed)
    async with serving(control, engine):
        await control.reapply()
        assert refreshed == ["refresh"]
