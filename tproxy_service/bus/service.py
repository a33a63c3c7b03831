"""io.github.Tproxyd.Manager1 on the system bus: a thin layer over Control.

One low-level message handler serves the object's methods and properties, because dbus-fast's
@method handlers do not see the caller's unique name, which polkit needs. Each method call runs
as a task: check the signature, validate the arguments, admit it (or refuse it at once with Busy:
admission.py), authorize, call Control, reply. Any
change of a property value is sent in PropertiesChanged with its new value."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface

from .. import __version__
from ..control import Control, parse_mode_argument
from ..errors import TproxydError
from ..ifname import validate_ifname
from ..state_store import AUTO
from .admission import Admission
from .auth import Authorizer
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


class AlreadyRunning(TproxydError):
    """Another process owns io.github.Tproxyd."""


class _Introspection(ServiceInterface):
    """Exported only so dbus-fast's Introspect of the parent paths lists our object; every call
    to our path is answered by BusService's message handler first."""

    def __init__(self) -> None:
        super().__init__(MANAGER_IFACE)

    def introspect(self) -> intr.Interface:
        return introspect_manager()


class BusService:
    def __init__(self, bus: MessageBus, control: Control) -> None:
        self._bus = bus
        self._control = control
        self._auth = Authorizer(bus)
        self._admission = Admission()
        self._ready = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._emitted = self._values()
        self._introspection = introspect_node(OBJECT_PATH).tostring()

    # --- properties ----------------------------------------------------------------------------

    def _values(self) -> dict[str, Any]:
        status = self._control.status
        return {
            "Enabled": self._control.enabled,
            "Links": {name: "" if c == AUTO else c for name, c in self._control.links.items()},
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
        if self._closed:
            return
        try:
            self._emit_changes()
        except Exception:
            log.exception("sending PropertiesChanged failed")

    def _emit_changes(self) -> None:
        values = self._values()
        changed = {k: v for k, v in values.items() if self._emitted.get(k) != v}
        self._emitted = values
        if changed:
            variants = {k: Variant(PROPERTIES_BY_NAME[k].signature, v) for k, v in changed.items()}
            self._bus.send(
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
            ifname, choice = validate_ifname(body[0]), parse_mode_argument(body[1])
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

    async def _call(self, msg: Message, spec: MethodSpec) -> None:
        sender = msg.sender or ""
        try:
            operation = self._prepare(spec, msg.body)
            with self._admission.connection(sender):
                root = await self._auth.is_root(sender)
                with contextlib.nullcontext() if root else self._admission.unprivileged():
                    await self._auth.check(msg, spec.action)
                    await operation()
            reply = Message.new_method_return(msg)
        except Exception as e:
            reply = error_reply(msg, e)
        self._reply(msg, reply)

    def _reply(self, call: Message, reply: Message) -> None:
        if not self._closed and not call.flags & MessageFlag.NO_REPLY_EXPECTED:
            self._bus.send(reply)

    def on_message(self, msg: Message) -> bool:
        """dbus-fast message handler: True when we took the message."""
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != OBJECT_PATH:
            return False
        if msg.interface == PROPERTIES_IFACE:
            self._reply(msg, self._properties_call(msg))
            return True
        if msg.member == "Introspect" and msg.interface in (INTROSPECTABLE_IFACE, None) and not msg.signature:
            self._reply(msg, Message.new_method_return(msg, "s", [self._introspection]))
            return True
        if msg.interface == OBJECT_MANAGER_IFACE:
            self._reply(msg, Message.new_error(msg, ERROR_UNKNOWN_INTERFACE, "tproxyd has no such interface."))
            return True
        if msg.interface not in (MANAGER_IFACE, None):
            return False  # Peer: dbus-fast's default
        spec = METHODS_BY_NAME.get(msg.member or "")
        if spec is None:
            if msg.interface is None:
                return False
            self._reply(msg, Message.new_error(msg, ERROR_UNKNOWN_METHOD, f"{MANAGER_IFACE} has no such method."))
            return True
        if msg.signature != spec.signature:
            self._reply(msg, Message.new_error(msg, ERROR_INVALID_ARGS, spec.usage()))
            return True
        task = asyncio.create_task(self._call(msg, spec), name=f"dbus {spec.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    # --- lifetime ------------------------------------------------------------------------------

    def watch_connection(self) -> None:
        task = asyncio.create_task(self._watch(), name="dbus watch")
        self._tasks.add(task)

    async def _watch(self) -> None:
        with contextlib.suppress(Exception):  # an abnormal end is still an end
            await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        if not self._closed:
            log.error("lost the system bus connection; the D-Bus API is gone until tproxyd restarts")
            self._closed = True

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        self._bus.disconnect()


async def start(control: Control) -> BusService | None:
    """Connect to the system bus ($DBUS_SYSTEM_BUS_ADDRESS honoured), export Manager1 and own
    io.github.Tproxyd. None (and one warning) when there is no usable bus: tproxyd then runs
    without its D-Bus API. Raises AlreadyRunning when another process owns the name."""
    try:
        bus = await connect_system_bus()
    except Exception as e:
        log.warning("no system bus (%s); running without the D-Bus API", e or type(e).__name__)
        return None
    service = BusService(bus, control)
    bus.add_message_handler(service.on_message)
    bus.export(OBJECT_PATH, _Introspection())
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except DBusError as e:
        bus.disconnect()
        log.warning("the system bus refused us %s (%s); running without the D-Bus API", BUS_NAME, e.text)
        return None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        bus.disconnect()
        raise AlreadyRunning(f"another process already owns {BUS_NAME} on the system bus")
    control.add_listener(service.refresh)
    service.watch_connection()
    log.info("owning %s on the system bus", BUS_NAME)
    return service
