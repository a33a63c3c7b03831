"""io.github.Tproxyd.Manager1 on the system bus: a thin layer over Control.

One low-level message handler serves the object's methods and properties, because dbus-fast's
@method handlers do not see the caller's unique name, which polkit needs. Each method call runs
as a task: check the signature, validate the arguments, admit it (or refuse it at once with Busy:
call_limits.py), authorize, call Control, reply. Any change of a property value is sent in
PropertiesChanged with its new value. When the bus goes away (dbus-daemon restarted) or is not
there yet, a keeper task connects again with a backoff and owns the name again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface

from .. import __version__
from ..control import Control
from ..errors import TproxydError
from ..ifname import validate_ifname
from ..model import LinkChoice
from .auth import Authorizer
from .call_limits import CallLimits
from .connection import connect_system_bus
from .errors import error_reply
from .names import (
    BUS_NAME,
    ERROR_INVALID_ARGS,
    ERROR_PROPERTY_READ_ONLY,
    ERROR_UNKNOWN_INTERFACE,
    ERROR_UNKNOWN_METHOD,
    ERROR_UNKNOWN_PROPERTY,
    INTROSPECTABLE_IFACE,
    MANAGER_IFACE,
    OBJECT_MANAGER_IFACE,
    OBJECT_PATH,
    PEER_IFACE,
    PROPERTIES_IFACE,
)
from .spec import METHODS_BY_NAME, PROPERTIES, PROPERTIES_BY_NAME, MethodSpec, introspect_manager, introspect_node

log = logging.getLogger(__name__)
RECONNECT_FIRST = 0.25  # s before the first attempt to reach the bus again; doubles up to:
RECONNECT_MAX = 30.0


class AlreadyRunning(TproxydError):
    """Another process owns io.github.Tproxyd."""


class _Introspection(ServiceInterface):
    """Exported only so dbus-fast's Introspect of the parent paths lists our object; every call
    to our path is answered by BusService's message handler first."""

    def __init__(self) -> None:
        super().__init__(MANAGER_IFACE)

    def introspect(self) -> intr.Interface:
        return introspect_manager()


@dataclass
class _Connection:
    """One connection to the bus. Unique names are per bus instance, so what we know about
    callers (their uids, their calls in flight) belongs to the connection; replies go back on
    the connection the call came in on."""

    bus: MessageBus
    auth: Authorizer
    limits: CallLimits = field(default_factory=CallLimits)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        for task in self.tasks:
            task.cancel()
        self.bus.disconnect()


class BusService:
    def __init__(self, control: Control, on_reconnect: Callable[[], Awaitable[None]] | None = None) -> None:
        """`on_reconnect` runs after the name is owned again on a new connection (the bus
        restarted, or appeared after we started)."""
        self._control = control
        self._on_reconnect = on_reconnect
        self._conn: _Connection | None = None
        self._ready = False
        self._closed = False
        self._keeper: asyncio.Task[None] | None = None
        self.why_unconnected = ""  # why the last connect() failed
        self._emitted = self._values()
        self._introspection = introspect_node(OBJECT_PATH).tostring()

    # --- properties ----------------------------------------------------------------------------

    def _values(self) -> dict[str, Any]:
        status = self._control.status
        return {
            "Enabled": self._control.enabled,
            "Links": {name: c.to_bus() for name, c in self._control.link_choices.items()},
            "ActiveLinks": list(status.active_links),
            "State": status.state.value if self._ready else "starting",
            "CoreState": status.core_state,
            "FailurePolicy": self._control.config.tproxy.failure_policy.value,
            "LastError": status.last_error,
            "Warnings": list(self._control.warnings),
            "Version": __version__,
        }

    def ready(self) -> None:
        """The first reconcile finished: State leaves "starting"."""
        self._ready = True
        self.refresh()

    def refresh(self) -> None:
        """Send PropertiesChanged for what changed since the last call (called by the engine and
        Control after every change; it must never raise into them)."""
        if self._closed or self._conn is None:
            return
        try:
            self._emit_changes(self._conn.bus)
        except Exception:
            log.exception("sending PropertiesChanged failed")

    def _emit_changes(self, bus: MessageBus) -> None:
        values = self._values()
        changed = {k: v for k, v in values.items() if self._emitted.get(k) != v}
        self._emitted = values
        if changed:
            variants = {k: Variant(PROPERTIES_BY_NAME[k].signature, v) for k, v in changed.items()}
            bus.send(
                Message.new_signal(
                    OBJECT_PATH, PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as", [MANAGER_IFACE, variants, []]
                )
            )

    def _properties_call(self, msg: Message) -> Message:
        values = self._values()
        member, sig, body = msg.member, msg.signature, msg.body
        if member == "GetAll" and sig == "s":
            if body[0] in (MANAGER_IFACE, ""):
                props = {p.name: Variant(p.signature, values[p.name]) for p in PROPERTIES}
                return Message.new_method_return(msg, "a{sv}", [props])
            if body[0] in (PROPERTIES_IFACE, INTROSPECTABLE_IFACE, PEER_IFACE):
                return Message.new_method_return(msg, "a{sv}", [{}])
            return Message.new_error(msg, ERROR_UNKNOWN_INTERFACE, "tproxyd has no such interface.")
        if member in ("Get", "Set") and sig == ("ss" if member == "Get" else "ssv"):
            if body[0] != MANAGER_IFACE:
                return Message.new_error(msg, ERROR_UNKNOWN_INTERFACE, "tproxyd has no such interface.")
            prop = PROPERTIES_BY_NAME.get(body[1])
            if prop is None:
                return Message.new_error(msg, ERROR_UNKNOWN_PROPERTY, "tproxyd has no such property.")
            if member == "Set":
                return Message.new_error(
                    msg, ERROR_PROPERTY_READ_ONLY, "tproxyd's properties are read-only; use its methods."
                )
            return Message.new_method_return(msg, "v", [Variant(prop.signature, values[prop.name])])
        if member in ("Get", "GetAll", "Set"):
            return Message.new_error(msg, ERROR_INVALID_ARGS, f"wrong signature for {member}.")
        return Message.new_error(msg, ERROR_UNKNOWN_METHOD, "no such method.")

    # --- methods -------------------------------------------------------------------------------

    def _prepare(self, spec: MethodSpec, body: list[Any]) -> Callable[[], Awaitable[None]]:
        """Validate the arguments (before asking polkit); returns the call to make."""
        control = self._control
        if spec.name == "EnableLink":
            ifname, choice = validate_ifname(body[0]), LinkChoice.from_bus(body[1])
            return lambda: control.enable_link(ifname, choice)
        if spec.name == "DisableLink":
            ifname = validate_ifname(body[0])
            return lambda: control.disable_link(ifname)
        if spec.name == "SetEnabled":
            enabled = bool(body[0])
            return lambda: control.set_enabled(enabled)
        if spec.name == "Reapply":
            return control.reapply
        assert spec.name == "Reload"
        return control.reload

    async def _call(self, conn: _Connection, msg: Message, spec: MethodSpec) -> None:
        sender = msg.sender or ""
        try:
            operation = self._prepare(spec, msg.body)
            with conn.limits.connection(sender):
                root = await conn.auth.is_root(sender)
                with contextlib.nullcontext() if root else conn.limits.unprivileged():
                    await conn.auth.check(msg, spec.action)
                    await operation()
            reply = Message.new_method_return(msg)
        except Exception as e:
            reply = error_reply(msg, e)
        self._reply(conn, msg, reply)

    def _reply(self, conn: _Connection, call: Message, reply: Message) -> None:
        # (A call may arrive before RequestName's reply: activation hands the queued one over then.)
        if not conn.closed and not call.flags & MessageFlag.NO_REPLY_EXPECTED:
            conn.bus.send(reply)

    def _on_message(self, conn: _Connection, msg: Message) -> bool:
        """dbus-fast message handler of `conn`: True when we took the message."""
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != OBJECT_PATH:
            return False
        if msg.interface == PROPERTIES_IFACE:
            self._reply(conn, msg, self._properties_call(msg))
            return True
        if msg.member == "Introspect" and msg.interface in (INTROSPECTABLE_IFACE, None) and not msg.signature:
            self._reply(conn, msg, Message.new_method_return(msg, "s", [self._introspection]))
            return True
        if msg.interface == OBJECT_MANAGER_IFACE:
            self._reply(conn, msg, Message.new_error(msg, ERROR_UNKNOWN_INTERFACE, "tproxyd has no such interface."))
            return True
        if msg.interface not in (MANAGER_IFACE, None):
            return False  # Peer: dbus-fast's default
        spec = METHODS_BY_NAME.get(msg.member or "")
        if spec is None:
            if msg.interface is None:
                return False
            error = Message.new_error(msg, ERROR_UNKNOWN_METHOD, f"{MANAGER_IFACE} has no such method.")
            self._reply(conn, msg, error)
            return True
        if msg.signature != spec.signature:
            self._reply(conn, msg, Message.new_error(msg, ERROR_INVALID_ARGS, spec.usage()))
            return True
        task = asyncio.create_task(self._call(conn, msg, spec), name=f"dbus {spec.name}")
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)
        return True

    # --- lifetime ------------------------------------------------------------------------------

    async def connect(self) -> bool:
        """Connect, export Manager1 and own io.github.Tproxyd. False when there is no usable
        bus (the reason in `why_unconnected`); raises AlreadyRunning when another process owns
        the name."""
        try:
            bus = await connect_system_bus()
        except Exception as e:
            log.debug("cannot connect to the system bus: %s", e or type(e).__name__)
            self.why_unconnected = f"no system bus ({e or type(e).__name__})"
            return False
        conn = _Connection(bus, Authorizer(bus))
        bus.add_message_handler(lambda msg: self._on_message(conn, msg))
        bus.export(OBJECT_PATH, _Introspection())
        try:
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as e:
            conn.close()
            self.why_unconnected = f"the system bus refused us {BUS_NAME} ({e.text})"
            return False
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            conn.close()
            raise AlreadyRunning(f"another process already owns {BUS_NAME} on the system bus")
        self._conn = conn
        self._emitted = self._values()
        log.info("owning %s on the system bus", BUS_NAME)
        return True

    @property
    def connection(self) -> MessageBus | None:
        """The system-bus connection while we have one: the daemon's only one, which the
        NetworkManager monitor shares (docs/architecture.md, "What each adapter owns")."""
        return self._conn.bus if self._conn is not None else None

    def keep_connected(self) -> None:
        """From now on, whenever the bus goes away (or is not there yet), connect again with a
        backoff and own the name again. The rules stay in place meanwhile."""
        self._keeper = asyncio.create_task(self._keep_connected(), name="dbus keeper")

    async def _keep_connected(self) -> None:
        while not self._closed:
            if self._conn is not None:
                with contextlib.suppress(Exception):  # an abnormal end is still an end
                    await self._conn.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
                if self._closed:
                    return
                log.error("lost the system bus connection; the rules stay, reconnecting")
                self._conn.close()
                self._conn = None
            delay = RECONNECT_FIRST
            while True:
                await asyncio.sleep(delay)
                try:
                    if await self.connect():
                        break
                except AlreadyRunning as e:
                    log.error("%s; retrying", e)
                delay = min(delay * 2, RECONNECT_MAX)
            if self._on_reconnect is not None:
                try:
                    await self._on_reconnect()
                except Exception:
                    log.exception("re-subscribing after the bus came back failed")

    def close(self) -> None:
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
        if self._conn is not None:
            self._conn.close()


async def start(control: Control, on_reconnect: Callable[[], Awaitable[None]] | None = None) -> BusService:
    """Connect to the system bus ($DBUS_SYSTEM_BUS_ADDRESS honoured), export Manager1 and own
    io.github.Tproxyd, and keep doing so. Without a usable bus tproxyd runs without its D-Bus
    API (one warning) until the bus appears. Raises AlreadyRunning when another process owns
    the name at start."""
    service = BusService(control, on_reconnect)
    if not await service.connect():
        log.warning("%s; running without the D-Bus API until it appears", service.why_unconnected)
    control.add_listener(service.refresh)
    service.keep_connected()
    return service
