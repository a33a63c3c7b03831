"""NetworkManager on the system bus -> NmFacts for the engine (docs/architecture.md, "The reconcile pass").

The monitor subscribes first (NetworkManager's signals, its name's owner changes, logind's
PrepareForSleep), then reads NetworkManager's state. Every relevant signal schedules one full
re-read: reads coalesce (however many signals arrive during a read, one more read follows), and
a read that changed the facts is handed to the engine as one request. A read costs three
round trips (manager, then devices and active connections concurrently, then the settings of
connections not seen before), so an activation reaches the kernel within milliseconds.

NetworkManager may be absent at start, appear later, crash or restart: while it is away the last
facts are kept (a crashed NetworkManager leaves the links configured, so their proxying stays),
marked not running; when it (re)appears everything is read again and re-applied. Without a
system bus at all tproxyd follows netlink alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from ..bus.call import CallError, add_match, call_method, method_call, plain, remove_match
from ..bus.names import (
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    LOGIN1_MANAGER_IFACE,
    LOGIN1_NAME,
    NM_ACTIVE_IFACE,
    NM_DEVICE_IFACE,
    NM_IFACE,
    NM_NAME,
    NM_PATH,
    NM_SETTINGS_CONNECTION_IFACE,
    PROPERTIES_IFACE,
)
from ..coalescer import Coalescer
from ..model import NmConnection, NmDevice, NmFacts
from ..nm_policy import DEVICE_TYPES, UNKNOWN_TYPE

log = logging.getLogger(__name__)

NM_STATE_ASLEEP = 10
AC_ACTIVATING, AC_ACTIVATED = 1, 2
AC_FLAG_EXTERNAL = 0x80  # NM_ACTIVATION_STATE_FLAG_EXTERNAL: generated for a link NM did not configure
CALL_TIMEOUT = 5.0  # s per call to NetworkManager
START_TIMEOUT = 3.0  # s the daemon's first reconcile waits for NetworkManager's state

MATCH_RULES = (
    f"type='signal',sender='{NM_NAME}',path_namespace='{NM_PATH}'",
    f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_IFACE}',member='NameOwnerChanged',arg0='{NM_NAME}'",
    f"type='signal',sender='{LOGIN1_NAME}',interface='{LOGIN1_MANAGER_IFACE}',member='PrepareForSleep'",
)
# What a signal must touch to matter to us; anything else (IP configs, statistics...) is ignored.
RELEVANT_PROPERTIES = {
    NM_IFACE: frozenset({"State", "Devices", "ActiveConnections", "PrimaryConnection"}),
    NM_DEVICE_IFACE: frozenset({"State", "Interface", "IpInterface", "DeviceType", "ActiveConnection"}),
    NM_ACTIVE_IFACE: frozenset({"State", "StateFlags", "Devices", "Id", "Uuid"}),
}
RELEVANT_SIGNALS = {
    (NM_IFACE, "DeviceAdded"),
    (NM_IFACE, "DeviceRemoved"),
    (NM_IFACE, "StateChanged"),
    (NM_DEVICE_IFACE, "StateChanged"),
    (NM_ACTIVE_IFACE, "StateChanged"),
}
_GONE = frozenset(
    {
        "org.freedesktop.DBus.Error.UnknownObject",
        "org.freedesktop.DBus.Error.UnknownMethod",
        "org.freedesktop.DBus.Error.UnknownInterface",
    }
)


# --- pure: D-Bus property dicts -> facts ----------------------------------------------------------


@dataclass(frozen=True)
class ActiveProps:
    """The properties of one active connection that we use (plus its settings' method)."""

    path: str
    id: str
    uuid: str
    state: int
    flags: int
    devices: tuple[str, ...]
    vpn: bool
    shared: bool


def nm_ifname(escaped: str) -> str:
    """The kernel's interface name from NetworkManager's D-Bus `Interface`/`IpInterface`, which
    NetworkManager escapes (a backslash doubled, other unsafe bytes as \\ooo octal)."""
    if "\\" not in escaped:
        return escaped
    raw = bytearray()
    i = 0
    while i < len(escaped):
        octal = escaped[i + 1 : i + 4]
        if escaped[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            raw.append(int(octal, 8) & 0xFF)
            i += 4
        elif escaped[i] == "\\" and escaped[i + 1 : i + 2] == "\\":
            raw.append(0x5C)
            i += 2
        else:
            raw += escaped[i].encode()
            i += 1
    return raw.decode(errors="replace")


def build_facts(
    manager: Mapping[str, Any], devices: Mapping[str, Mapping[str, Any]], actives: Sequence[ActiveProps]
) -> NmFacts:
    """NetworkManager's manager and device properties (plain values, by object path) and its
    active connections -> NmFacts."""
    links: dict[str, NmDevice] = {}
    for path, props in devices.items():
        iface = nm_ifname(str(props.get("IpInterface") or props.get("Interface") or ""))
        if iface:
            links[path] = NmDevice(iface, DEVICE_TYPES.get(int(props.get("DeviceType", 0)), UNKNOWN_TYPE),
                                   int(props.get("State", 0)))  # fmt: skip
    connections = []
    for ac in actives:
        # A plugin VPN's devices are its parent's: matching it would proxy the wrong link.
        if ac.vpn or ac.state not in (AC_ACTIVATING, AC_ACTIVATED):
            continue
        for path in ac.devices:
            device = links.get(path)
            if device is not None:
                connections.append(
                    NmConnection(
                        ifname=device.iface,
                        device_type=device.type,
                        id=ac.id,
                        uuid=ac.uuid,
                        shared=ac.shared,
                        external=bool(ac.flags & AC_FLAG_EXTERNAL),
                        activated=ac.state == AC_ACTIVATED,
                    )
                )
    primary = next((ac.uuid for ac in actives if ac.path == manager.get("PrimaryConnection")), "")
    return NmFacts(
        running=True,
        asleep=int(manager.get("State", 0)) == NM_STATE_ASLEEP,
        devices=tuple(sorted(links.values(), key=lambda d: d.iface)),
        connections=tuple(sorted(connections, key=lambda c: (c.ifname, c.uuid))),
        primary=primary,
    )


def is_shared(settings: Mapping[str, Mapping[str, Any]]) -> bool:
    """A connection's settings (a{sa{sv}}, plain values) share it: ipv4/ipv6 method "shared"."""
    return any(settings.get(family, {}).get("method") == "shared" for family in ("ipv4", "ipv6"))


# --- the monitor ----------------------------------------------------------------------------------


class NetworkManagerMonitor:
    """Calls `on_facts(facts, reason)` when NetworkManager's facts changed and `on_wake(reason)`
    after a resume from suspend or NetworkManager's (re)appearance (a re-apply)."""

    def __init__(
        self,
        on_facts: Callable[[NmFacts, str], object],
        on_wake: Callable[[str], object],
        bus: MessageBus,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        """`bus`: the daemon's system-bus connection (the D-Bus service's; shared, never closed
        here)."""
        self._on_facts = on_facts
        self._on_wake = on_wake
        self._timeout = call_timeout
        self._shared_bus = bus
        self._bus: MessageBus | None = None  # while subscribed
        self._owner: str | None = None  # NetworkManager's unique name while it is on the bus
        self._facts = NmFacts()
        self._shared: dict[tuple[str, str], bool] = {}  # (owner, active connection path) -> shared
        self._wake_after_read = False
        self._failures = 0  # consecutive failed reads: retried with a growing delay, logged once
        self._reads = Coalescer(self._read_and_publish, "networkmanager-monitor", after=self._retry_after_failure)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def facts(self) -> NmFacts:
        return self._facts

    # --- lifetime --------------------------------------------------------------------------------

    async def start(self, wait: float = START_TIMEOUT) -> None:
        """Subscribe, then read NetworkManager's state (waiting up to `wait` s for the first read,
        so the daemon's first reconcile already has it)."""
        bus = self._bus = self._shared_bus
        bus.add_message_handler(self._on_message)
        try:
            for rule in MATCH_RULES:
                await add_match(bus, rule, self._timeout)
            self._owner = await self._name_owner()
        except (CallError, TimeoutError) as e:
            log.warning("could not subscribe to NetworkManager (%s); not following it", e)
            await self._unsubscribe()
            return
        if self._owner:
            log.info("following NetworkManager")
        else:
            log.info("NetworkManager is not on the system bus; links follow netlink until it appears")
        self._reads.start()
        self._tasks = [asyncio.create_task(self._watch(bus), name="networkmanager-bus")]
        if self._owner:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read_soon("startup"), wait)

    async def stop(self) -> None:
        await self._reads.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        """Leave the shared connection as we found it (best effort: it may be gone already)."""
        bus, self._bus = self._bus, None
        if bus is None:
            return
        bus.remove_message_handler(self._on_message)
        if bus.connected:
            for rule in MATCH_RULES:
                with contextlib.suppress(Exception):
                    await remove_match(bus, rule, self._timeout)

    async def refresh(self, wait: float = 1.0) -> None:
        """Re-read everything now (Reapply: `nmcli device reapply` changes nothing we get a signal
        for). Bounded, so that Reapply answers within the dispatcher hook's 2 s even when
        NetworkManager does not answer."""
        if self._bus is None or self._owner is None:
            return
        self._shared.clear()
        try:
            await asyncio.wait_for(self._read_soon("reapply"), wait)
        except TimeoutError:
            log.warning("NetworkManager did not answer within %g s; re-applying with what we know", wait)

    async def _name_owner(self) -> str | None:
        try:
            return str((await self._call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetNameOwner", "s", [NM_NAME]))[0])
        except CallError as e:
            if e.name == "org.freedesktop.DBus.Error.NameHasNoOwner":
                return None
            raise

    async def _watch(self, bus: MessageBus) -> None:
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        if self._bus is bus:
            log.error("lost the system bus connection: not following NetworkManager any more")
            self._owner = None
            self._publish(dataclasses.replace(self._facts, running=False), ["system bus lost"])

    # --- signals ---------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        # Only broadcasts: anyone may send us a unicast signal; the bus sets the sender field.
        if msg.message_type is not MessageType.SIGNAL or msg.destination is not None:
            return
        try:
            if msg.sender == DBUS_NAME and msg.member == "NameOwnerChanged":
                self._owner_changed(msg.body[0], msg.body[2])
            elif msg.interface == LOGIN1_MANAGER_IFACE and msg.member == "PrepareForSleep":
                if not msg.body[0]:  # resumed: re-apply, and re-read NetworkManager to be sure
                    log.info("resumed from suspend; re-applying")
                    self._on_wake("resumed from suspend")
                    if self._owner is not None:
                        self._schedule("resumed from suspend")
            elif self._owner is not None and msg.sender == self._owner:
                reason = _relevant(msg)
                if reason:
                    self._schedule(reason)
        except Exception:  # one odd signal must not stop the monitor
            log.exception("could not handle a NetworkManager signal")

    def _owner_changed(self, name: str, new: str) -> None:
        if name != NM_NAME:
            return
        self._shared.clear()
        if new:
            log.info("NetworkManager appeared on the system bus; reading its state")
            self._owner = new
            self._wake_after_read = True
            self._schedule("NetworkManager appeared")
        elif self._owner is not None:
            log.warning("NetworkManager left the system bus; its links keep their last known state")
            self._owner = None
            self._schedule("NetworkManager left")

    # --- reading ---------------------------------------------------------------------------------

    def _schedule(self, reason: str) -> int:
        return self._reads.request(reason)

    async def _read_soon(self, reason: str) -> None:
        await self._reads.wait_for(self._schedule(reason))

    async def _read_and_publish(self, reasons: list[str]) -> None:
        owner = self._owner
        facts: NmFacts | None = None
        try:
            facts = await self._read(owner) if owner else dataclasses.replace(self._facts, running=False)
            self._failures = 0
        except (CallError, TimeoutError) as e:
            if owner == self._owner:  # else NetworkManager went away under us: its signal follows
                self._failures += 1
                level = logging.WARNING if self._failures == 1 else logging.DEBUG
                log.log(level, "reading NetworkManager's state failed (%s); retrying", e)
        if facts is not None and owner == self._owner:
            self._publish(facts, reasons)

    async def _retry_after_failure(self) -> None:
        if self._failures:
            await asyncio.sleep(min(2.0 ** (self._failures - 1), 30.0))
            self._schedule("retry")

    def _publish(self, facts: NmFacts, reasons: Iterable[str]) -> None:
        reason = "NetworkManager: " + ", ".join(dict.fromkeys(reasons))
        previous, self._facts = self._facts, facts
        woke = previous.asleep and not facts.asleep and facts.running
        if facts != previous:
            self._on_facts(facts, reason)
        if facts.asleep and not previous.asleep:
            log.info("NetworkManager is asleep")
        if woke or (self._wake_after_read and facts.running):
            self._wake_after_read = False
            reason = "NetworkManager woke up" if woke else "NetworkManager (re)started"
            log.info("%s; re-applying", reason)
            self._on_wake(reason)

    async def _read(self, owner: str) -> NmFacts:
        manager = await self._get_all(owner, NM_PATH, NM_IFACE)
        device_paths = [str(p) for p in manager.get("Devices", [])]
        active_paths = [str(p) for p in manager.get("ActiveConnections", [])]
        device_props, active_props = await asyncio.gather(
            asyncio.gather(*(self._get_all(owner, p, NM_DEVICE_IFACE, missing_ok=True) for p in device_paths)),
            asyncio.gather(*(self._get_all(owner, p, NM_ACTIVE_IFACE, missing_ok=True) for p in active_paths)),
        )
        live = {(owner, p) for p in active_paths}
        self._shared = {k: v for k, v in self._shared.items() if k in live}
        actives = await asyncio.gather(
            *(self._active(owner, path, props) for path, props in zip(active_paths, active_props, strict=True) if props)
        )
        devices = {path: props for path, props in zip(device_paths, device_props, strict=True) if props}
        return build_facts(manager, devices, actives)

    async def _active(self, owner: str, path: str, props: Mapping[str, Any]) -> ActiveProps:
        devices = tuple(str(d) for d in props.get("Devices", []))
        state = int(props.get("State", 0))
        shared = False
        if state in (AC_ACTIVATING, AC_ACTIVATED) and not props.get("Vpn"):
            shared = await self._is_shared(owner, path, devices, str(props.get("Connection", "/")))
        return ActiveProps(
            path=path,
            id=str(props.get("Id", "")),
            uuid=str(props.get("Uuid", "")).lower(),
            state=state,
            flags=int(props.get("StateFlags", 0)),
            devices=devices,
            vpn=bool(props.get("Vpn", False)),
            shared=shared,
        )

    async def _is_shared(self, owner: str, path: str, devices: tuple[str, ...], settings_path: str) -> bool:
        """The applied connection says what the link does now (a modified but not re-applied
        profile does not); the saved profile is the fallback. Cached per activation."""
        key = (owner, path)
        if key in self._shared:
            return self._shared[key]
        settings: Any = None
        if devices:
            with contextlib.suppress(CallError):
                settings = (await self._call(owner, devices[0], NM_DEVICE_IFACE, "GetAppliedConnection", "u", [0]))[0]
        if settings is None and settings_path != "/":
            try:
                settings = (await self._call(owner, settings_path, NM_SETTINGS_CONNECTION_IFACE, "GetSettings"))[0]
            except CallError as e:
                log.warning("cannot read the settings of active connection %s (%s); taking it as not shared", path, e)
                return False  # not cached: the next read tries again
        shared = is_shared(plain(settings or {}))
        self._shared[key] = shared
        return shared

    async def _get_all(self, owner: str, path: str, iface: str, missing_ok: bool = False) -> dict[str, Any]:
        try:
            body = await self._call(owner, path, PROPERTIES_IFACE, "GetAll", "s", [iface])
        except CallError as e:
            if missing_ok and e.name in _GONE:  # removed between the list and this read
                return {}
            raise
        return {k: plain(v) for k, v in body[0].items()}

    async def _call(
        self, destination: str, path: str, iface: str, member: str, signature: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        assert self._bus is not None
        return await call_method(
            self._bus, method_call(destination, path, iface, member, signature, body), self._timeout
        )


def _relevant(msg: Message) -> str | None:
    """A short reason when a NetworkManager signal can change our facts, else None."""
    where = (msg.path or "").removeprefix(NM_PATH + "/") or "manager"
    if msg.interface == PROPERTIES_IFACE and msg.member == "PropertiesChanged":
        iface, changed = msg.body[0], msg.body[1]
        keys = RELEVANT_PROPERTIES.get(iface, frozenset()) & changed.keys()
        return f"{where} {','.join(sorted(keys))}" if keys else None
    if (msg.interface, msg.member) in RELEVANT_SIGNALS:
        return f"{where} {msg.member}"
    return None
