"""A minimal org.kde.StatusNotifierWatcher with a host (what a panel's tray provides), for the
tray tests: prints `ready`, then `registered SERVICE` for every item that registers. Runs until
SIGTERM. Usage: python sni_watcher.py SESSION_BUS_ADDRESS"""

from __future__ import annotations

import signal
import sys
from typing import Any

from gi.repository import Gio, GLib

XML = """<node><interface name="org.kde.StatusNotifierWatcher">
  <method name="RegisterStatusNotifierItem"><arg name="service" type="s" direction="in"/></method>
  <method name="RegisterStatusNotifierHost"><arg name="service" type="s" direction="in"/></method>
  <property name="RegisteredStatusNotifierItems" type="as" access="read"/>
  <property name="IsStatusNotifierHostRegistered" type="b" access="read"/>
  <property name="ProtocolVersion" type="i" access="read"/>
  <signal name="StatusNotifierItemRegistered"><arg type="s"/></signal>
  <signal name="StatusNotifierItemUnregistered"><arg type="s"/></signal>
  <signal name="StatusNotifierHostRegistered"/>
</interface></node>"""
items: list[str] = []


def on_call(conn: Any, sender: str, _p: str, _i: str, method: str, params: Any, invocation: Any) -> None:
    (service,) = params.unpack()
    if method == "RegisterStatusNotifierItem":
        items.append(service)
        print(f"registered {service} {sender}", flush=True)
        conn.emit_signal(None, "/StatusNotifierWatcher", "org.kde.StatusNotifierWatcher",
                         "StatusNotifierItemRegistered", GLib.Variant("(s)", (service,)))  # fmt: skip
    invocation.return_value(None)


def on_get(_c: Any, _s: str, _p: str, _i: str, name: str) -> Any:
    return {
        "RegisteredStatusNotifierItems": GLib.Variant("as", items),
        "IsStatusNotifierHostRegistered": GLib.Variant("b", True),
        "ProtocolVersion": GLib.Variant("i", 0),
    }[name]


def main() -> None:
    conn = Gio.DBusConnection.new_for_address_sync(
        sys.argv[1],
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None,
        None,
    )
    info = Gio.DBusNodeInfo.new_for_xml(XML).interfaces[0]
    conn.register_object("/StatusNotifierWatcher", info, on_call, on_get, None)
    loop = GLib.MainLoop()

    def owned(*_: Any) -> None:
        print("ready", flush=True)

    def lost(*_: Any) -> None:
        print("could not own org.kde.StatusNotifierWatcher", flush=True)
        loop.quit()

    Gio.bus_own_name_on_connection(conn, "org.kde.StatusNotifierWatcher", Gio.BusNameOwnerFlags.NONE, owned, lost)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    loop.run()


if __name__ == "__main__":
    main()
