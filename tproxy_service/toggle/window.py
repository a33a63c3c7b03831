"""The small GTK 4 / libadwaita window, for desktops without a tray host: the same words and
switches as the GNOME toggle (presentation.present), errors as a toast."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gi  # type: ignore[import-untyped]

gi.require_version("Gtk", "4.0")
gi.require_version("Adw", "1")
from gi.repository import Adw, Gtk  # type: ignore[import-untyped]  # noqa: E402

log = logging.getLogger(__name__)
APP_ID = "io.github.Tproxyd.Toggle"
__all__ = ["APP_ID", "Adw", "Gtk", "Window"]  # Adw, Gtk: imported here after gi.require_version


def summary(view: dict[str, Any]) -> str:
    """One line for the log: the state in words | the rows."""
    return f"{view['status']} | " + "; ".join(row["text"] for row in view["rows"])


class Window:
    def __init__(self, app: Any, call: Callable[[dict[str, Any]], None]) -> None:
        self._call = call
        self._syncing = False
        self._view: dict[str, Any] | None = None
        self.window = Adw.ApplicationWindow(application=app, title="Transparent proxy")
        self.window.set_default_size(460, -1)
        self._toasts = Adw.ToastOverlay()
        box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        box.append(Adw.HeaderBar())
        page = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=18)
        for side in ("top", "bottom", "start", "end"):
            getattr(page, f"set_margin_{side}")(18)
        self._main = Adw.PreferencesGroup()
        self._master_row = Adw.ActionRow(title="Proxy")
        self._icon = Gtk.Image()
        self._master_row.add_prefix(self._icon)
        self._master = Gtk.Switch(valign=Gtk.Align.CENTER)
        self._master.connect("notify::active", self._master_flipped)
        self._master_row.add_suffix(self._master)
        self._master_row.set_activatable_widget(self._master)
        self._main.add(self._master_row)
        self._links = Adw.PreferencesGroup(title="Links")
        self._link_rows: list[Any] = []
        page.append(self._main)
        page.append(self._links)
        box.append(page)
        self._toasts.set_child(box)
        self.window.set_content(self._toasts)

    def present(self) -> None:
        self.window.present()
        self._master.grab_focus()  # Space flips the master switch at once
        if self._view is not None:
            self._log_when_drawn(summary(self._view))

    def show(self, view: dict[str, Any]) -> None:
        self._view = view
        self._syncing = True
        try:
            self._master.set_active(view["checked"])
            self._master.set_sensitive(view["sensitive"])
            self._master_row.set_title(view["title"])
            self._master_row.set_subtitle(view["status"])
            self._icon.set_from_icon_name(view["icon"])
            self.window.set_title(f"{view['headerTitle']}: {view['status']}")
            for row in self._link_rows:
                self._links.remove(row)
            self._link_rows = []
            for row in view["rows"]:
                widget = Adw.ActionRow(title=row["text"], use_markup=False)
                if row["kind"] == "link":
                    switch = Gtk.Switch(active=row["on"], valign=Gtk.Align.CENTER)
                    switch.connect("notify::active", self._link_flipped, row["action"])
                    widget.add_suffix(switch)
                    widget.set_activatable_widget(switch)
                else:
                    widget.set_sensitive(False)
                self._links.add(widget)
                self._link_rows.append(widget)
        finally:
            self._syncing = False
        log.info("showing: %s", view["status"])
        self._log_when_drawn(summary(view))

    def _log_when_drawn(self, status: str) -> None:
        """--verbose: say when a frame with this state has been painted (tests screenshot then)."""
        clock = self.window.get_frame_clock()
        if clock is None or not log.isEnabledFor(logging.INFO):
            return
        handler = 0

        def painted(_clock: Any) -> None:
            clock.disconnect(handler)
            log.info("drawn: %s", status)

        handler = clock.connect("after-paint", painted)
        self.window.queue_draw()

    def _master_flipped(self, switch: Any, _pspec: Any) -> None:
        if self._syncing or self._view is None or not self._view["sensitive"]:
            return
        self._call({"method": "SetEnabled", "args": [bool(switch.get_active())]})

    def _link_flipped(self, _switch: Any, _pspec: Any, action: dict[str, Any]) -> None:
        if not self._syncing:
            self._call(action)

    def notify(self, title: str, body: str) -> None:
        toast = Adw.Toast(title=f"{title}: {body}", timeout=5)
        self._toasts.add_toast(toast)
