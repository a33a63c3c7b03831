"""tproxyd and NetworkManager as the toggle sees them, over GDBus (GLib's main loop, like GTK's).

A port of the GNOME Shell extension's Client: a Gio.DBusProxy for io.github.Tproxyd (it follows
the name's owner and PropertiesChanged; DO_NOT_AUTO_START, so a stopped tproxyd shows as stopped),
NetworkManager's devices when NetworkManager is on the bus, and method calls that allow
interactive authorization (polkit may ask for a password through the desktop's agent)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gi.repository import Gio, GLib  # type: ignore[import-untyped]

from ..bus.names import BUS_NAME, MANAGER_IFACE, OBJECT_PATH

log = logging.getLogger(__name__)

NM_NAME = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
NM_IFACE = "org.freedesktop.NetworkManager"
NM_DEVICE_IFACE = "org.freedesktop.NetworkManager.Device"
CALL_TIMEOUT_MS = 5 * 60 * 1000  # a person may be typing a password into polkit's dialog
SIGNATURES = {"EnableLink": "(ss)", "DisableLink": "(s)", "SetEnabled": "(b)"}

Snapshot = dict[str, Any]
OnChange = Callable[[Snapshot], None]
OnError = Callable[[dict[str, Any], "str | None", str], None]


def remote_error(error: Any) -> tuple[str | None, str]:
    """(D-Bus error name or None, the message without GDBus's "GDBus.Error:NAME: " prefix)."""
    name = Gio.DBusError.get_remote_error(error)
    message = str(error.message)
    if name and message.startswith(f"GDBus.Error:{name}: "):
        message = message[len(f"GDBus.Error:{name}: ") :]
    return (str(name) if name else None), message


class Client:
    def __init__(self, connection: Any, on_change: OnChange, on_error: OnError) -> None:
        self._conn = connection
        self._on_change = on_change
        self._on_error = on_error
        self._cancellable = Gio.Cancellable()
        self._proxy: Any = None
        self._nm_links: list[str] | None = None
        self._nm_signals: list[int] = []
        self._nm_generation = 0
        Gio.DBusProxy.new(
            connection,
            Gio.DBusProxyFlags.DO_NOT_AUTO_START,
            None,
            BUS_NAME,
            OBJECT_PATH,
            MANAGER_IFACE,
            self._cancellable,
            self._proxy_ready,
        )
        self._nm_watch = Gio.bus_watch_name_on_connection(
            connection, NM_NAME, Gio.BusNameWatcherFlags.NONE, self._nm_appeared, self._nm_vanished
        )

    def _proxy_ready(self, _source: Any, result: Any) -> None:
        try:
            self._proxy = Gio.DBusProxy.new_finish(result)
        except GLib.Error as e:
            if not e.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CANCELLED):
                log.error("cannot create the D-Bus proxy: %s", e.message)
            return
        self._proxy.connect("g-properties-changed", lambda *_: self._changed())
        self._proxy.connect("notify::g-name-owner", lambda *_: self._changed())
        self._changed()

    def snapshot(self) -> Snapshot:
        proxy = self._proxy
        props: dict[str, Any] | None = None
        if proxy is not None and proxy.get_name_owner():
            props = {}
            for name in proxy.get_cached_property_names():
                props[name] = proxy.get_cached_property(name).unpack()
            if "State" not in props:
                props = None  # owned, but GetAll has not answered yet
        return {"running": props is not None, "props": props, "nmLinks": self._nm_links}

    def _changed(self) -> None:
        self._on_change(self.snapshot())

    def call(self, request: dict[str, Any]) -> None:
        """request: {method, args}, as in presentation's row actions."""
        if self._proxy is None:
            return
        params = GLib.Variant(SIGNATURES[request["method"]], tuple(request["args"]))

        def done(proxy: Any, result: Any) -> None:
            try:
                proxy.call_finish(result)
            except GLib.Error as e:
                if e.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CANCELLED):
                    return
                name, message = remote_error(e)
                self._on_error(request, name, message)
            self._changed()  # show the true state again

        self._proxy.call(
            request["method"],
            params,
            Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION,
            CALL_TIMEOUT_MS,
            self._cancellable,
            done,
        )

    # --- NetworkManager: the links it has now ---------------------------------------------------

    def _nm_appeared(self, *_: Any) -> None:
        for member in ("DeviceAdded", "DeviceRemoved"):
            self._nm_signals.append(
                self._conn.signal_subscribe(
                    NM_NAME,
                    NM_IFACE,
                    member,
                    NM_PATH,
                    None,
                    Gio.DBusSignalFlags.NONE,
                    lambda *_: self.refresh_network_manager(),
                )
            )
        self.refresh_network_manager()

    def _nm_vanished(self, *_: Any) -> None:
        for sub in self._nm_signals:
            self._conn.signal_unsubscribe(sub)
        self._nm_signals = []
        self._nm_generation += 1
        if self._nm_links is not None:
            self._nm_links = None
            self._changed()

    def refresh_network_manager(self) -> None:
        if not self._nm_signals:
            return  # NetworkManager is not on the bus
        self._nm_generation += 1
        generation = self._nm_generation

        def got_devices(conn: Any, result: Any) -> None:
            try:
                (paths,) = conn.call_finish(result).unpack()
            except GLib.Error as e:
                log.info("cannot list NetworkManager's devices: %s", e.message)
                return
            names: dict[str, str] = {}
            if not paths:
                finish(names, paths)
            for path in paths:
                conn.call(
                    NM_NAME, path, "org.freedesktop.DBus.Properties", "Get",
                    GLib.Variant("(ss)", (NM_DEVICE_IFACE, "Interface")), GLib.VariantType("(v)"),
                    Gio.DBusCallFlags.NO_AUTO_START, 5000, self._cancellable,
                    lambda c, r, p=path: got_name(c, r, p, names, paths),
                )  # fmt: skip

        def got_name(conn: Any, result: Any, path: str, names: dict[str, str], paths: list[str]) -> None:
            try:
                (value,) = conn.call_finish(result).unpack()
                names[path] = str(value)
            except GLib.Error:
                names[path] = ""
            if len(names) == len(paths):
                finish(names, paths)

        def finish(names: dict[str, str], paths: list[str]) -> None:
            if generation != self._nm_generation:
                return  # a newer refresh or NetworkManager's exit overtook this one
            self._nm_links = [names[p] for p in paths if names[p]]
            self._changed()

        self._conn.call(
            NM_NAME, NM_PATH, NM_IFACE, "GetDevices", None, GLib.VariantType("(ao)"),
            Gio.DBusCallFlags.NO_AUTO_START, 5000, self._cancellable, got_devices,
        )  # fmt: skip

    def close(self) -> None:
        self._cancellable.cancel()
        Gio.bus_unwatch_name(self._nm_watch)
        for sub in self._nm_signals:
            self._conn.signal_unsubscribe(sub)
        self._nm_signals = []
