"""tproxyd's state -> what the fallback toggle shows: a line-by-line port of the GNOME Shell
extensions' pure module (desktop/gnome-shell/45/tproxyd@tproxyd.github.io/presentation.js, an ES
module; the GNOME 43/44 extension has a copy generated from it).

Both are checked against the same table of cases (desktop/tests/presentation_cases.json), so the
tray entry, the window and the Quick Settings toggle say the same words. Change both, then the
table. Values are plain JSON-like dicts so that the table compares them as they are."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cmp_to_key
from typing import Any

TITLE = "Proxy"
HEADER_TITLE = "Transparent proxy"
MAX_OTHER_LINKS = 8  # NetworkManager links offered in the menu, at most

ICONS = {
    "active": "network-vpn-symbolic",
    "off": "network-vpn-disabled-symbolic",
    "starting": "network-vpn-acquiring-symbolic",
    "warning": "network-vpn-no-route-symbolic",
}

NOT_RUNNING = "tproxyd is not running"
WARNING_STATES = ("degraded", "blocked", "failed")


def mode_text(mode: str) -> str:
    return "auto" if mode == "" else mode


def _list_names(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]} and {names[1]}"
    return f"{names[0]}, {names[1]} and {len(names) - 2} more"


def _cmp(a: Any, b: Any) -> int:
    return -1 if a < b else 1 if a > b else 0


def _natural_key(name: str) -> list[str | int]:
    return [int(run) if i % 2 else run for i, run in enumerate(re.split(r"([0-9]+)", name))]


def _compare(a: str, b: str) -> int:
    ka, kb = _natural_key(a), _natural_key(b)
    for x, y in zip(ka, kb, strict=False):
        c = _cmp(x, y)
        if c:
            return c
    return _cmp(len(ka), len(kb)) or _cmp(a, b)


def _sorted(names: Iterable[str]) -> list[str]:
    """Natural order (eth2 before eth10), as the JS module sorts."""
    return sorted(names, key=cmp_to_key(_compare))


def status_text(props: Mapping[str, Any]) -> str:
    """The state in words: tooltip, window subtitle, the toggle's label in GNOME 43."""
    state = props.get("State")
    if state == "off":
        return "proxy off"
    if state == "starting":
        return "starting"
    if state == "degraded":
        return "core down: traffic direct"
    if state == "blocked":
        return "blocked: core down"
    if state == "failed":
        return f"failed: {props['LastError']}" if props.get("LastError") else "failed"
    if state == "active":
        active = _sorted(props.get("ActiveLinks") or [])
        if active:
            return f"active on {_list_names(active)}"
        configured = _sorted((props.get("Links") or {}).keys())
        if not configured:
            return "active: no link chosen"
        if len(configured) > 2:
            return f"active: waiting for {len(configured)} links"
        return f"active: waiting for {_list_names(configured)}"
    return str(state) if state else "unknown"


def _icon(running: bool, props: Mapping[str, Any] | None) -> str:
    if not running or not props or props.get("State") == "off":
        return ICONS["off"]
    if props.get("State") == "starting":
        return ICONS["starting"]
    if props.get("State") in WARNING_STATES:
        return ICONS["warning"]
    return ICONS["active"]


def _link_rows(props: Mapping[str, Any], nm_links: Sequence[str] | None) -> list[dict[str, Any]]:
    links: Mapping[str, str] = props.get("Links") or {}
    active = props.get("ActiveLinks") or []
    rows: list[dict[str, Any]] = []
    for ifname in _sorted(links):
        text = f"{ifname} · {mode_text(links[ifname])}"
        if props.get("State") == "active":
            text += " · proxied" if ifname in active else " · not present"
        rows.append(
            {"kind": "link", "ifname": ifname, "text": text, "on": True,
             "action": {"method": "DisableLink", "args": [ifname]}}
        )  # fmt: skip
    if nm_links is not None:
        others = _sorted({n for n in nm_links if n and n != "lo" and n not in links})
        for ifname in others[:MAX_OTHER_LINKS]:
            rows.append(
                {"kind": "link", "ifname": ifname, "text": f"{ifname} · not proxied", "on": False,
                 "action": {"method": "EnableLink", "args": [ifname, ""]}}
            )  # fmt: skip
        if len(others) > MAX_OTHER_LINKS:
            rows.append({"kind": "note", "text": f"{len(others) - MAX_OTHER_LINKS} more: tproxyctl enable IFNAME"})
    if not rows:
        rows.append({"kind": "note", "text": "No links chosen: tproxyctl enable IFNAME"})
    return rows


def present(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the toggle shows for one snapshot {running, props, nmLinks}."""
    props: Mapping[str, Any] | None = snapshot.get("props") if snapshot.get("running") else None
    if props is None:
        status, icon = NOT_RUNNING, _icon(False, None)
        return _shown(
            status,
            icon,
            sensitive=False,
            checked=False,
            indicator={"visible": False, "icon": icon, "warning": False},
            rows=[{"kind": "note", "text": "Start it with: systemctl start tproxyd"}],
        )
    status, icon = status_text(props), _icon(True, props)
    enabled = bool(props.get("Enabled"))
    proxying = enabled and props.get("State") != "off"
    return _shown(
        status,
        icon,
        sensitive=True,
        checked=enabled,
        indicator={"visible": proxying, "icon": icon, "warning": proxying and props.get("State") in WARNING_STATES},
        rows=_link_rows(props, snapshot.get("nmLinks")),
    )


def _shown(
    status: str, icon: str, *, sensitive: bool, checked: bool, indicator: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The toggle's view: the status text is its title's subtitle and its accessible name too."""
    return {
        "sensitive": sensitive,
        "checked": checked,
        "title": TITLE,
        "status": status,
        "icon": icon,
        "accessibleName": f"{HEADER_TITLE}: {status}",
        "headerTitle": HEADER_TITLE,
        "headerSubtitle": status,
        "indicator": indicator,
        "rows": rows,
    }


def notification_for(request: Mapping[str, Any], error_name: str | None, message: str) -> dict[str, str]:
    """The short notification for a call that failed: {title, body}."""
    method, args = request["method"], request["args"]
    if method == "SetEnabled":
        title = f"Could not turn the proxy {'on' if args[0] else 'off'}"
    elif method == "EnableLink":
        title = f"Could not proxy {args[0]}"
    elif method == "DisableLink":
        title = f"Could not stop proxying {args[0]}"
    else:
        title = f"{method} failed"
    body = message or error_name or "unknown error"
    if error_name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"):
        body = NOT_RUNNING
    elif error_name == "org.freedesktop.DBus.Error.AccessDenied" and not message:
        body = "not authorized (polkit)"
    return {"title": title, "body": body}
