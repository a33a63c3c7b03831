"""Control: choices applied through the (real) engine on fake adapters, saved only on success,
rolled back on failure, idempotent, and [links] defaults under the choices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tproxy_service.control import Control
from tproxy_service.engine import Engine
from tproxy_service.errors import InvalidArgument, KernelError, TproxydError
from tproxy_service.model import Config, LinkChoice, LinkMode
from tproxy_service.state_store import Choices, StateStore

from ..support import async_test
from .test_engine import FakeFacts, FakeNft, FakeRouting, control_for, serving


def make(tmp_path: Path, links: dict[str, LinkMode] | None = None) -> tuple[Control, Engine, FakeRouting, StateStore]:
    routing = FakeRouting()
    engine = Engine(Config(link_defaults=links or {"eth0": LinkMode.LAN}), FakeNft(), routing, FakeFacts())
    store = StateStore(tmp_path)
    return control_for(engine, store), engine, routing, store


def test_mode_argument() -> None:
    assert [LinkChoice.from_bus(m) for m in ("", "host", "lan", "both")] == ["auto", "host", "lan", "both"]
    assert [c.to_bus() for c in (LinkChoice.AUTO, LinkChoice.HOST, LinkChoice.LAN, LinkChoice.BOTH)] == [
        "",
        "host",
        "lan",
        "both",
    ]
    for bad in ("auto", "Host", "disabled", "x" * 1000):
        with pytest.raises(InvalidArgument, match="no such mode"):
            LinkChoice.from_bus(bad)


@async_test
async def test_enable_disable_saved_and_applied(tmp_path: Path) -> None:
    control, engine, _routing, store = make(tmp_path)
    async with serving(control, engine, remove=False):
        await control.enable_link("wlan0", LinkChoice.AUTO)
        assert engine.proxied_links == {"eth0": LinkMode.LAN, "wlan0": LinkMode.HOST}  # auto is host for now
        await control.disable_link("eth0")
        await control.set_enabled(False)
        assert control.link_choices == {"wlan0": "auto"} and not control.enabled and not engine.intent.enabled
    assert store.load() == Choices(False, {"eth0": "disabled", "wlan0": "auto"})


@async_test
async def test_failed_apply_restores_choices_and_saves_nothing(tmp_path: Path) -> None:
    control, engine, routing, store = make(tmp_path)
    notified: list[None] = []
    control.add_listener(lambda: notified.append(None))
    async with serving(control, engine, remove=False):
        await control.set_enabled(False)
        saved = store.path.read_text()
        routing.fail_ensure = True
        with pytest.raises(KernelError, match="rolled back"):
            await control.set_enabled(True)
        assert not control.enabled and not engine.intent.enabled
        assert store.path.read_text() == saved
    assert notified


@async_test
async def test_unsavable_choice_is_rolled_back(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    control, engine, _routing, _store = make(tmp_path)
    control._store = StateStore(blocker)  # mkdir fails: a file is in the way
    async with serving(control, engine, remove=False):
        with pytest.raises(TproxydError, match="could not save"):
            await control.enable_link("wlan0", LinkChoice.HOST)
        assert control.link_choices == {"eth0": "lan"} and "wlan0" not in engine.proxied_links


@async_test
async def test_repeated_choice_writes_nothing(tmp_path: Path) -> None:
    control, engine, _routing, store = make(tmp_path)
    async with serving(control, engine, remove=False):
        await control.enable_link("wlan0", LinkChoice.LAN)
        first = store.path.stat().st_mtime_ns, store.path.stat().st_ino
        passes = engine.passes
        await control.enable_link("wlan0", LinkChoice.LAN)
        await control.disable_link("never-enabled")
        assert (store.path.stat().st_mtime_ns, store.path.stat().st_ino) == first
        assert engine.passes == passes


@async_test
async def test_new_config_defaults_stay_under_choices(tmp_path: Path) -> None:
    control, engine, _routing, _store = make(tmp_path)
    async with serving(control, engine, remove=False):
        await control.enable_link("eth0", LinkChoice.BOTH)
        ticket = control.use_config(
            dataclasses.replace(engine.config, link_defaults={"eth0": LinkMode.HOST, "eth1": LinkMode.LAN})
        )
        await engine.wait_for(ticket)
        assert control.link_choices == {"eth0": "both", "eth1": "lan"}
