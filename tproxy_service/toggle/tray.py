"""The tray entry: a StatusNotifierItem (org.kde.StatusNotifierItem) with its menu exported as
com.canonical.dbusmenu, written directly on GDBus: no GTK, so it also runs where GTK 3 and 4
cannot share a process. KDE Plasma, XFCE's panel, and GNOME with the AppIndicator extension host it.

The menu says what the GNOME toggle says (presentation.present): the state in words, the master
switch, the configured links (checked) and NetworkManager's other links (unchecked: one click
proxies them in auto mode). Activating the item (a left click on KDE's panel, a double click
with GNOME's AppIndicator extension) flips the master switch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from gi.repository import Gio, GLib  # type: ignore[import-untyped]

from . import presentation

log = logging.getLogger(__name__)

WATCHER_NAME = "org.kde.StatusNotifierWatcher"
WATCHER_PATH = "/StatusNotifierWatcher"
WATCHER_IFACE = "org.kde.StatusNotifierWatcher"
ITEM_PATH = "/StatusNotifierItem"
ITEM_IFACE = "org.kde.StatusNotifierItem"
MENU_PATH = "/MenuBar"
MENU_IFACE = "com.canonical.dbusmenu"
ITEM_ID = "tproxyd-toggle"

ITEM_XML = f"""<node><interface name="{ITEM_IFACE}">
  <property name="Category" type="s" access="read"/>
  <property name="Id" type="s" access="read"/>
  <property name="Title" type="s" access="read"/>
  <property name="Status" type="s" access="read"/>
  <property name="WindowId" type="i" access="read"/>
  <property name="IconName" type="s" access="read"/>
  <property name="IconPixmap" type="a(iiay)" access="read"/>
  <property name="OverlayIconName" type="s" access="read"/>
  <property name="AttentionIconName" type="s" access="read"/>
  <property name="ToolTip" type="(sa(iiay)ss)" access="read"/>
  <property name="IconAccessibleDesc" type="s" access="read"/>
  <property name="AttentionAccessibleDesc" type="s" access="read"/>
  <property name="ItemIsMenu" type="b" access="read"/>
  <property name="Menu" type="o" access="read"/>
  <method name="ContextMenu"><arg name="x" type="i" direction="in"/><arg name="y" type="i" direction="in"/></method>
  <method name="Activate"><arg name="x" type="i" direction="in"/><arg name="y" type="i" direction="in"/></method>
  <method name="SecondaryActivate">
    <arg name="x" type="i" direction="in"/><arg name="y" type="i" direction="in"/>
  </method>
  <method name="Scroll">
    <arg name="delta" type="i" direction="in"/><arg name="orientation" type="s" direction="in"/>
  </method>
  <signal name="NewTitle"/><signal name="NewIcon"/><signal name="NewAttentionIcon"/><signal name="NewOverlayIcon"/>
  <signal name="NewToolTip"/><signal name="NewStatus"><arg name="status" type="s"/></signal>
</interface></node>"""

MENU_XML = f"""<node><interface name="{MENU_IFACE}">
  <property name="Version" type="u" access="read"/>
  <property name="TextDirection" type="s" access="read"/>
  <property name="Status" type="s" access="read"/>
  <property name="IconThemePath" type="as" access="read"/>
  <method name="GetLayout">
    <arg type="i" name="parentId" direction="in"/><arg type="i" name="recursionDepth" direction="in"/>
    <arg type="as" name="propertyNames" direction="in"/>
    <arg type="u" name="revision" direction="out"/><arg type="(ia{{sv}}av)" name="layout" direction="out"/>
  </method>
  <method name="GetGroupProperties">
    <arg type="ai" name="ids" direction="in"/><arg type="as" name="propertyNames" direction="in"/>
    <arg type="a(ia{{sv}})" name="properties" direction="out"/>
  </method>
  <method name="GetProperty">
    <arg type="i" name="id" direction="in"/><arg type="s" name="name" direction="in"/>
    <arg type="v" name="value" direction="out"/>
  </method>
  <method name="Event">
    <arg type="i" name="id" direction="in"/><arg type="s" name="eventId" direction="in"/>
    <arg type="v" name="data" direction="in"/><arg type="u" name="timestamp" direction="in"/>
  </method>
  <method name="EventGroup">
    <arg type="a(isvu)" name="events" direction="in"/><arg type="ai" name="idErrors" direction="out"/>
  </method>
  <method name="AboutToShow">
    <arg type="i" name="id" direction="in"/><arg type="b" name="needUpdate" direction="out"/>
  </method>
  <method name="AboutToShowGroup">
    <arg type="ai" name="ids" direction="in"/>
    <arg type="ai" name="updatesNeeded" direction="out"/><arg type="ai" name="idErrors" direction="out"/>
  </method>
  <signal name="ItemsPropertiesUpdated">
    <arg type="a(ia{{sv}})" name="updatedProps"/><arg type="a(ias)" name="removedProps"/>
  </signal>
  <signal name="LayoutUpdated"><arg type="u" name="revision"/><arg type="i" name="parent"/></signal>
  <signal name="ItemActivationRequested"><arg type="i" name="id"/><arg type="u" name="timestamp"/></signal>
</interface></node>"""

STATUS_ID, MASTER_ID, SEPARATOR_ID, FIRST_ROW_ID = 1, 2, 3, 10


def _label(text: str) -> str:
    return text.replace("_", "__")  # dbusmenu labels use "_" for mnemonics


def menu_items(view: dict[str, Any]) -> tuple[list[tuple[int, dict[str, Any]]], dict[int, dict[str, Any]]]:
    """(ordered [(id, properties)], {id: action}) for one presentation.present() view."""
    items: list[tuple[int, dict[str, Any]]] = [
        (STATUS_ID, {"label": _label(view["status"]), "enabled": False}),
        (MASTER_ID, {
            "label": view["title"], "toggle-type": "checkmark",
            "toggle-state": 1 if view["checked"] else 0, "enabled": view["sensitive"],
        }),
        (SEPARATOR_ID, {"type": "separator"}),
    ]  # fmt: skip
    actions: dict[int, dict[str, Any]] = {}
    if view["sensitive"]:
        actions[MASTER_ID] = {"method": "SetEnabled", "args": [not view["checked"]]}
    for i, row in enumerate(view["rows"]):
        item_id = FIRST_ROW_ID + i
        if row["kind"] == "link":
            items.append((item_id, {"label": _label(row["text"]), "toggle-type": "checkmark",
                                    "toggle-state": 1 if row["on"] else 0}))  # fmt: skip
            actions[item_id] = row["action"]
        else:
            items.append((item_id, {"label": _label(row["text"]), "enabled": False}))
    return items, actions


def _variant(value: Any) -> Any:
    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        return GLib.Variant("i", value)
    return GLib.Variant("s", str(value))


class Tray:
    """The StatusNotifierItem on `session`; `call(request)` sends a row's action to tproxyd."""

    def __init__(self, session: Any, call: Callable[[dict[str, Any]], None]) -> None:
        self._bus = session
        self._call = call
        self._view: dict[str, Any] = presentation.present({"running": False, "props": None, "nmLinks": None})
        self._items, self._actions = menu_items(self._view)
        self._revision = 1
        self.registered = False
        self.bus_name = f"org.kde.StatusNotifierItem-{os.getpid()}-1"
        item_info = Gio.DBusNodeInfo.new_for_xml(ITEM_XML).interfaces[0]
        menu_info = Gio.DBusNodeInfo.new_for_xml(MENU_XML).interfaces[0]
        self._ids = [
            session.register_object(ITEM_PATH, item_info, self._item_call, self._item_property, None),
            session.register_object(MENU_PATH, menu_info, self._menu_call, self._menu_property, None),
        ]
        self._own = Gio.bus_own_name_on_connection(session, self.bus_name, Gio.BusNameOwnerFlags.NONE, None, None)
        self._watch = Gio.bus_watch_name_on_connection(
            session, WATCHER_NAME, Gio.BusNameWatcherFlags.NONE, self._watcher_appeared, self._watcher_vanished
        )

    # --- what it shows ------------------------------------------------------------------------

    def show(self, view: dict[str, Any]) -> None:
        old, old_items = self._view, dict(self._items)
        self._view = view
        self._items, self._actions = menu_items(view)
        # dbusmenu: LayoutUpdated when items come or go; ItemsPropertiesUpdated when an item's
        # label or check mark changes (hosts re-read only the structure on LayoutUpdated).
        updated = [(i, self._props(i, [])) for i, props in self._items if i in old_items and old_items[i] != props]
        removed = [
            (i, [k for k in old_items[i] if k not in props])
            for i, props in self._items
            if i in old_items and set(old_items[i]) - set(props)
        ]
        if updated or removed:
            self._emit(
                MENU_PATH, MENU_IFACE, "ItemsPropertiesUpdated", GLib.Variant("(a(ia{sv})a(ias))", (updated, removed))
            )
        if [i for i, _ in self._items] != list(old_items):
            self._revision += 1
            self._emit(MENU_PATH, MENU_IFACE, "LayoutUpdated", GLib.Variant("(ui)", (self._revision, 0)))
        if view["icon"] != old["icon"]:
            self._emit(ITEM_PATH, ITEM_IFACE, "NewIcon", None)
        if view["status"] != old["status"]:
            self._emit(ITEM_PATH, ITEM_IFACE, "NewToolTip", None)
            self._emit(ITEM_PATH, ITEM_IFACE, "NewTitle", None)
        if self._status(view) != self._status(old):
            self._emit(ITEM_PATH, ITEM_IFACE, "NewStatus", GLib.Variant("(s)", (self._status(view),)))

    @staticmethod
    def _status(view: dict[str, Any]) -> str:
        if view["indicator"]["warning"]:
            return "NeedsAttention"
        return "Active"

    def _emit(self, path: str, iface: str, signal: str, params: Any) -> None:
        try:
            self._bus.emit_signal(None, path, iface, signal, params)
        except GLib.Error as e:
            log.warning("cannot send %s: %s", signal, e.message)

    # --- org.kde.StatusNotifierWatcher --------------------------------------------------------

    def _watcher_appeared(self, conn: Any, _name: str, _owner: str) -> None:
        def done(c: Any, result: Any) -> None:
            try:
                c.call_finish(result)
                self.registered = True
                log.info("registered with the StatusNotifierWatcher (%s)", self.bus_name)
            except GLib.Error as e:
                log.warning("the StatusNotifierWatcher refused us: %s", e.message)

        # Registered by object path (as libayatana-appindicator does: the watcher takes our unique
        # name from the message): GNOME's AppIndicator extension on Debian 12 fails to set up
        # items registered by well-known name; KDE and XFCE accept both.
        conn.call(
            WATCHER_NAME, WATCHER_PATH, WATCHER_IFACE, "RegisterStatusNotifierItem",
            GLib.Variant("(s)", (ITEM_PATH,)), None, Gio.DBusCallFlags.NONE, 5000, None, done,
        )  # fmt: skip

    def _watcher_vanished(self, *_: Any) -> None:
        self.registered = False

    # --- org.kde.StatusNotifierItem -----------------------------------------------------------

    def _item_property(self, _c: Any, _s: str, _p: str, _i: str, name: str) -> Any:
        view = self._view
        values = {
            "Category": GLib.Variant("s", "SystemServices"),
            "Id": GLib.Variant("s", ITEM_ID),
            "Title": GLib.Variant("s", f"{view['headerTitle']}: {view['status']}"),
            "Status": GLib.Variant("s", self._status(view)),
            "WindowId": GLib.Variant("i", 0),
            "IconName": GLib.Variant("s", view["icon"]),
            "IconPixmap": GLib.Variant("a(iiay)", []),
            "OverlayIconName": GLib.Variant("s", ""),
            "AttentionIconName": GLib.Variant("s", view["icon"]),
            "ToolTip": GLib.Variant("(sa(iiay)ss)", (view["icon"], [], view["headerTitle"], view["status"])),
            # Ayatana's accessibility extensions: GNOME's AppIndicator extension reads them and
            # logs a JS ERROR when an item lacks them.
            "IconAccessibleDesc": GLib.Variant("s", f"{view['headerTitle']}: {view['status']}"),
            "AttentionAccessibleDesc": GLib.Variant("s", f"{view['headerTitle']}: {view['status']}"),
            "ItemIsMenu": GLib.Variant("b", False),
            "Menu": GLib.Variant("o", MENU_PATH),
        }
        return values.get(name)

    def _item_call(self, _c: Any, _s: str, _p: str, _i: str, method: str, _params: Any, invocation: Any) -> None:
        if method == "Activate" and MASTER_ID in self._actions:
            self._call(self._actions[MASTER_ID])
        invocation.return_value(None)

    # --- com.canonical.dbusmenu ---------------------------------------------------------------

    def _menu_property(self, _c: Any, _s: str, _p: str, _i: str, name: str) -> Any:
        values = {
            "Version": GLib.Variant("u", 3),
            "TextDirection": GLib.Variant("s", "ltr"),
            "Status": GLib.Variant("s", "normal"),
            "IconThemePath": GLib.Variant("as", []),
        }
        return values.get(name)

    def _props(self, item_id: int, names: list[str]) -> dict[str, Any]:
        if item_id == 0:
            props: dict[str, Any] = {"children-display": "submenu"}
        else:
            props = dict(self._items)[item_id]
        return {k: _variant(v) for k, v in props.items() if not names or k in names}

    def _layout(self, names: list[str]) -> Any:
        children = [GLib.Variant("(ia{sv}av)", (i, self._props(i, names), [])) for i, _ in self._items]
        return (0, self._props(0, names), children)

    def _menu_call(self, _c: Any, _s: str, _p: str, _i: str, method: str, params: Any, invocation: Any) -> None:
        ids = {i for i, _ in self._items} | {0}
        if method == "GetLayout":
            _parent, _depth, names = params.unpack()
            invocation.return_value(GLib.Variant("(u(ia{sv}av))", (self._revision, self._layout(names))))
        elif method == "GetGroupProperties":
            wanted, names = params.unpack()
            out = [(i, self._props(i, names)) for i in wanted if i in ids]
            invocation.return_value(GLib.Variant("(a(ia{sv}))", (out,)))
        elif method == "GetProperty":
            item_id, name = params.unpack()
            value = self._props(item_id, [name]).get(name) if item_id in ids else None
            if value is None:
                invocation.return_dbus_error("org.freedesktop.DBus.Error.InvalidArgs", "no such item or property")
            else:
                invocation.return_value(GLib.Variant("(v)", (value,)))
        elif method == "Event":
            item_id, event, _data, _ts = params.unpack()
            self._event(item_id, event)
            invocation.return_value(None)
        elif method == "EventGroup":
            (events,) = params.unpack()
            errors = [item_id for item_id, *_ in events if item_id not in ids]
            for item_id, event, _data, _ts in events:
                self._event(item_id, event)
            invocation.return_value(GLib.Variant("(ai)", (errors,)))
        elif method == "AboutToShow":
            invocation.return_value(GLib.Variant("(b)", (False,)))
        elif method == "AboutToShowGroup":
            invocation.return_value(GLib.Variant("(aiai)", ([], [])))
        else:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownMethod", f"no method {method}")

    def _event(self, item_id: int, event: str) -> None:
        if event == "clicked" and item_id in self._actions:
            self._call(self._actions[item_id])

    def close(self) -> None:
        Gio.bus_unwatch_name(self._watch)
        Gio.bus_unown_name(self._own)
        for reg in self._ids:
            self._bus.unregister_object(reg)


def host_available(session: Any) -> bool:
    """Is there a StatusNotifierWatcher with a registered host (a panel that shows items)?"""
    try:
        reply = session.call_sync(
            WATCHER_NAME, WATCHER_PATH, "org.freedesktop.DBus.Properties", "Get",
            GLib.Variant("(ss)", (WATCHER_IFACE, "IsStatusNotifierHostRegistered")), GLib.VariantType("(v)"),
            Gio.DBusCallFlags.NO_AUTO_START, 2000, None,
        )  # fmt: skip
    except GLib.Error:
        return False
    return bool(reply.unpack()[0])
