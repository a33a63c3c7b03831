"""Readiness of the supervised core: checked on unit state changes, retried (bounded) while the
unit starts, never polled while nothing changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.support import wait_until_async
from tproxy_service.model import Config
from tproxy_service.proxycore import supervisor as sup
from tproxy_service.proxycore.systemd import UnitStatus


class FakeUnit:
    def __init__(self) -> None:
        self.status = UnitStatus()

    async def connect(self) -> None:
        pass

    async def start(self) -> str:
        return "done"

    async def stop(self) -> str:
        return "done"

    async def restart(self) -> str:
        return "done"

    def close(self) -> None:
        pass


class Sockets:
    """core_listening's stand-in: counts checks; `listening` is what the kernel would say."""

    def __init__(self) -> None:
        self.listening = False
        self.checks = 0

    def __call__(self, port: int, ipv6: bool, udp: bool) -> tuple[bool, str]:
        self.checks += 1
        return self.listening, "" if self.listening else "nothing listens on the tproxy port"


async def _until(condition: Callable[[], object], what: str) -> None:
    await wait_until_async(condition, 5, what)


def _nothing_scheduled() -> None:
    """No task but the test's own is left (the readiness retries are a task): nothing would
    wake the supervisor again before the next unit change."""
    assert asyncio.all_tasks() == {asyncio.current_task()}, asyncio.all_tasks()


@pytest.fixture
def sockets(monkeypatch: pytest.MonkeyPatch) -> Sockets:
    fake = Sockets()
    monkeypatch.setattr(sup, "core_listening", fake)
    monkeypatch.setattr(sup, "READY_POLL", 0.001)
    monkeypatch.setattr(sup, "READY_POLL_MAX", 0.004, raising=False)
    return fake


def _supervisor() -> sup.CoreSupervisor:
    return sup.CoreSupervisor(Config(), lambda listener: FakeUnit(), lambda reason: None)


def test_a_ready_core_is_not_polled(sockets: Sockets) -> None:
    async def scenario() -> None:
        s = _supervisor()
        await s.want(True)
        s.on_unit_change(UnitStatus(active_state="active"))
        await _until(lambda: sockets.checks >= 3, "retried while not listening")
        sockets.listening = True
        await _until(lambda: s.status.ready, "ready once listening")
        checks = sockets.checks
        assert s._poller is not None
        await _until(s._poller.done, "no readiness task left once ready")
        _nothing_scheduled()
        assert sockets.checks == checks
        # A state change (the core restarted) is checked afresh.
        sockets.listening = False
        s.on_unit_change(UnitStatus(active_state="activating"))
        assert not s.status.ready
        s.on_unit_change(UnitStatus(active_state="active"))
        await _until(lambda: sockets.checks > checks, "checked after the unit became active again")
        await s.close()
        await s.settle()

    asyncio.run(scenario())


def test_retries_while_starting_are_bounded(sockets: Sockets, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "READY_PATIENCE", 0.05, raising=False)

    async def scenario() -> None:
        s = _supervisor()
        await s.want(True)
        s.on_unit_change(UnitStatus(active_state="active"))
        assert s._poller is not None
        await _until(s._poller.done, "the retries end after READY_PATIENCE")
        assert not s.status.ready
        assert s.status.detail == "nothing listens on the tproxy port"
        _nothing_scheduled()
        await s.close()
        await s.settle()

    asyncio.run(scenario())
