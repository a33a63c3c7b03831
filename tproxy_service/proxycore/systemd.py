"""Controls one systemd unit through the manager's D-Bus API (org.freedesktop.systemd1).

Signals are subscribed to *before* any job is started (a fast job's JobRemoved must not be
missed), and unit property changes (ActiveState, SubState, NRestarts, ExecMainPID) are pushed
to `on_change` as they happen."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from ..bus.call import CallError, add_match, call_method, method_call
from ..bus.names import (
    PROPERTIES_IFACE,
    SYSTEMD_MANAGER_IFACE,
    SYSTEMD_NAME,
    SYSTEMD_PATH,
    SYSTEMD_SERVICE_IFACE,
    SYSTEMD_UNIT_IFACE,
)

log = logging.getLogger(__name__)
JOB_TIMEOUT = 30.0


class SystemdError(Exception):
    """The manager refused or could not be reached; the message is for a person."""


@dataclass(frozen=True)
class UnitStatus:
    active_state: str = "unknown"  # systemd's ActiveState, or "unreachable"
    sub_state: str = ""
    n_restarts: int = 0
    main_pid: int = 0


class SystemdUnit:
    def __init__(self, bus_spec: str, unit: str, on_change: Callable[[UnitStatus], None]) -> None:
        self._bus_spec = bus_spec
        self.unit = unit
        self._on_change = on_change
        self._bus: MessageBus | None = None
        self._path = ""
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._finished: dict[str, str] = {}  # JobRemoved seen before the job's reply was read
        self.status = UnitStatus()

    async def connect(self) -> None:
        if self._bus is not None and self._bus.connected:
            return
        try:
            if self._bus_spec == "system":
                bus = MessageBus(bus_type=BusType.SYSTEM)
            elif self._bus_spec == "user":
                bus = MessageBus(bus_type=BusType.SESSION)
            else:
                bus = MessageBus(bus_address=self._bus_spec)
            self._bus = await bus.connect()
        except Exception as e:
            raise SystemdError(f"cannot reach the systemd manager on the {self._bus_spec} bus: {e}") from None
        self._bus.add_message_handler(self._on_message)
        try:
            await add_match(self._bus, f"type='signal',sender='{SYSTEMD_NAME}'")
        except CallError as e:
            raise SystemdError(f"cannot subscribe to the systemd manager's signals: {e}") from None
        await self._manager("Subscribe")
        (self._path,) = await self._manager("LoadUnit", "s", [self.unit])
        await self.refresh()

    async def _call(
        self, dest: str, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        if self._bus is None:
            raise SystemdError("not connected to the systemd manager")
        try:
            return await call_method(self._bus, method_call(dest, path, iface, member, sig, body))
        except CallError as e:
            raise SystemdError(f"systemd {member} {self.unit}: {e.text or e.name}") from None

    async def _manager(self, member: str, sig: str = "", body: list[Any] | None = None) -> list[Any]:
        return await self._call(SYSTEMD_NAME, SYSTEMD_PATH, SYSTEMD_MANAGER_IFACE, member, sig, body)

    async def refresh(self) -> UnitStatus:
        (unit_props,) = await self._call(
            SYSTEMD_NAME, self._path, PROPERTIES_IFACE, "GetAll", "s", [SYSTEMD_UNIT_IFACE]
        )
        try:
            (service_props,) = await self._call(
                SYSTEMD_NAME, self._path, PROPERTIES_IFACE, "GetAll", "s", [SYSTEMD_SERVICE_IFACE]
            )
        except SystemdError:
            service_props = {}
        self._update({**unit_props, **service_props})
        return self.status

    def _update(self, props: dict[str, Any]) -> None:
        def get(name: str, default: Any) -> Any:
            return props[name].value if name in props else default

        new = UnitStatus(
            active_state=get("ActiveState", self.status.active_state),
            sub_state=get("SubState", self.status.sub_state),
            n_restarts=get("NRestarts", self.status.n_restarts),
            main_pid=get("ExecMainPID", self.status.main_pid),
        )
        if new != self.status:
            self.status = new
            self._on_change(new)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if (
            msg.member == "PropertiesChanged"
            and msg.path == self._path
            and msg.body[0] in (SYSTEMD_UNIT_IFACE, SYSTEMD_SERVICE_IFACE)
        ):
            self._update(msg.body[1])
        elif msg.member == "JobRemoved" and msg.interface == SYSTEMD_MANAGER_IFACE:
            _id, job_path, unit, result = msg.body
            future = self._jobs.pop(job_path, None)
            if future is not None:
                if not future.done():
                    future.set_result(result)
            elif unit == self.unit:
                self._finished[job_path] = result
                while len(self._finished) > 16:
                    self._finished.pop(next(iter(self._finished)))

    async def _job(self, method: str) -> str:
        """Run StartUnit/StopUnit/RestartUnit and wait for its JobRemoved result ("done", "failed", ...)."""
        await self.connect()
        pending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        (job_path,) = await self._manager(method, "ss", [self.unit, "replace"])
        # JobRemoved may have been dispatched before this coroutine resumed with the reply.
        if job_path in self._finished:
            pending.set_result(self._finished.pop(job_path))
        else:
            self._jobs[job_path] = pending
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(pending), JOB_TIMEOUT)
        self._jobs.pop(job_path, None)
        await self.refresh()
        return pending.result() if pending.done() else "timeout"

    async def start(self) -> str:
        return await self._job("StartUnit")

    async def stop(self) -> str:
        return await self._job("StopUnit")

    async def restart(self) -> str:
        return await self._job("RestartUnit")

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
