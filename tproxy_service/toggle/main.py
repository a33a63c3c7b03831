"""tproxyd-toggle: the desktop toggle for desktops other than GNOME Shell.

A tray entry (StatusNotifierItem) when the session has a tray host, else a small GTK 4 /
libadwaita window. Same D-Bus contract and same words as the GNOME Shell extension."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from gi.repository import Gio, GLib  # type: ignore[import-untyped]

from .. import __version__
from . import presentation
from .client import Client
from .tray import Tray, host_available

log = logging.getLogger("tproxy_service.toggle")

EXIT_NO_BUS = 6  # as tproxyctl: the system bus is not reachable
EXIT_NO_DISPLAY = 7  # no tray host and no display for the window


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tproxyd-toggle",
        description="Turn tproxyd's transparent proxying on and off from the desktop: a tray entry "
        "(StatusNotifierItem) where the panel has a tray, else a small window.",
    )
    parser.add_argument("--version", action="version", version=f"tproxyd-toggle {__version__}")
    parser.add_argument(
        "--mode",
        choices=("auto", "tray", "window"),
        default="auto",
        help="auto (default): the tray when a StatusNotifierWatcher with a host is on the session bus, else the window",
    )
    parser.add_argument("--verbose", action="store_true", help="log what is shown and every call")
    return parser.parse_args(argv)


def _session_bus() -> Any:
    try:
        return Gio.bus_get_sync(Gio.BusType.SESSION, None)
    except GLib.Error as e:
        log.info("no session bus: %s", e.message)
        return None


def _desktop_notify(session: Any, title: str, body: str) -> None:
    if session is None:
        return
    session.call(
        "org.freedesktop.Notifications", "/org/freedesktop/Notifications", "org.freedesktop.Notifications",
        "Notify", GLib.Variant("(susssasa{sv}i)", ("tproxyd-toggle", 0, presentation.ICONS["warning"], title, body,
                                                   [], {}, 5000)),
        None, Gio.DBusCallFlags.NONE, 5000, None, None,
    )  # fmt: skip


def _quit_on_signals(quit_: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, lambda: quit_() or GLib.SOURCE_REMOVE)


def run_tray(system: Any, session: Any) -> int:
    loop = GLib.MainLoop()
    holder: dict[str, Any] = {}

    def on_error(request: dict[str, Any], name: str | None, message: str) -> None:
        note = presentation.notification_for(request, name, message)
        log.warning("%s: %s", note["title"], note["body"])
        _desktop_notify(session, note["title"], note["body"])

    def on_change(snapshot: dict[str, Any]) -> None:
        view = presentation.present(snapshot)
        log.info("showing: %s", view["status"])
        holder["tray"].show(view)

    holder["tray"] = Tray(session, lambda request: holder["client"].call(request))
    holder["client"] = Client(system, on_change, on_error)
    _quit_on_signals(loop.quit)
    loop.run()
    holder["client"].close()
    holder["tray"].close()
    return 0


def run_window(system: Any, session: Any) -> int:
    try:
        from .window import APP_ID, Adw, Window
    except (ImportError, ValueError) as e:
        print(f"tproxyd-toggle: GTK 4 and libadwaita are needed for the window: {e}", file=sys.stderr)
        return EXIT_NO_DISPLAY
    flags = Gio.ApplicationFlags.FLAGS_NONE if session is not None else Gio.ApplicationFlags.NON_UNIQUE
    app = Adw.Application(application_id=APP_ID, flags=flags)
    holder: dict[str, Any] = {}

    def on_error(request: dict[str, Any], name: str | None, message: str) -> None:
        note = presentation.notification_for(request, name, message)
        log.warning("%s: %s", note["title"], note["body"])
        holder["window"].notify(note["title"], note["body"])

    def activate(_app: Any) -> None:
        if "window" in holder:
            holder["window"].present()
            return
        window = Window(app, lambda request: holder["client"].call(request))
        holder["window"] = window
        holder["client"] = Client(system, lambda s: window.show(presentation.present(s)), on_error)
        window.show(presentation.present(holder["client"].snapshot()))
        window.present()

    app.connect("activate", activate)
    _quit_on_signals(app.quit)
    if not _has_display():
        print("tproxyd-toggle: no tray host on the session bus and no display for a window", file=sys.stderr)
        return EXIT_NO_DISPLAY
    rc = int(app.run([sys.argv[0]]))
    if "client" in holder:
        holder["client"].close()
    return rc


def _has_display() -> bool:
    try:
        from .window import Gtk

        return bool(Gtk.init_check())
    except (ImportError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="tproxyd-toggle: %(message)s",
        stream=sys.stdout if args.verbose else sys.stderr,
    )
    try:
        system = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    except GLib.Error as e:
        print(f"tproxyd-toggle: cannot connect to the system bus: {e.message}", file=sys.stderr)
        return EXIT_NO_BUS
    session = _session_bus()
    mode = args.mode
    if mode == "auto":
        mode = "tray" if session is not None and host_available(session) else "window"
    log.info("mode: %s", mode)
    if mode == "tray":
        if session is None:
            print("tproxyd-toggle: the tray needs a session bus", file=sys.stderr)
            return EXIT_NO_BUS
        return run_tray(system, session)
    return run_window(system, session)


if __name__ == "__main__":
    sys.exit(main())
