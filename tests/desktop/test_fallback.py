"""`tproxyd-toggle`, the fallback for desktops other than GNOME Shell, run as an unprivileged user
against the real tproxyd and polkitd:

- with a tray host (a StatusNotifierWatcher on the session bus) it is a StatusNotifierItem, and its
  dbusmenu, driven over D-Bus as a panel would, turns the proxy off and on;
- without one it is a GTK 4 / libadwaita window under Xvfb, flipped with real key presses (xdotool).

Both show what the pure logic (presentation.present, checked against the GNOME extension's JS
module in test_presentation.py) says for the daemon's real properties."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gi", reason="python3-gi is needed (make deps)")
from gi.repository import Gio, GLib

from tests.integration import harness as h
from tproxy_service.bus import names
from tproxy_service.toggle import presentation as P
from tproxy_service.toggle import tray

from .conftest import NM_DEVICES, SHELL_USER, DesktopStack, MakeDaemon, output_dir, tpg_workdir
from .shell import SessionBus, as_user, chown_tree, user_env

TOGGLE = h.VENV_BIN / "tproxyd-toggle"
WATCHER = Path(__file__).resolve().parent / "sni_watcher.py"


@dataclass
class Desktop:
    """A user's session bus (and, on demand, Xvfb) with processes started in it, stopped by PID."""

    workdir: Path
    system_bus: str
    bus: SessionBus
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    display: str = ""

    def start(self, name: str, args: list[str], user: h.User = SHELL_USER) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        env = {**self.env, "DISPLAY": self.display} if self.display else self.env
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*as_user(user), *args], env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.procs.append(proc)
        return proc, log

    def start_xvfb(self) -> None:
        read_fd, write_fd = os.pipe()
        with (self.workdir / "xvfb.log").open("wb") as out:
            proc = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        self.procs.append(proc)
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            number = r.readline().strip()
        assert number, f"Xvfb did not start: {(self.workdir / 'xvfb.log').read_text()}"
        self.display = f":{number}"

    def x(self, *args: str) -> str:
        return h.run(list(args), env={"PATH": "/usr/bin:/bin", "DISPLAY": self.display}).stdout.strip()


@pytest.fixture
def desktop(desktop_stack: DesktopStack) -> Iterator[Desktop]:
    workdir = tpg_workdir()
    home, runtime = workdir / "home", workdir / "xdg-run"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    chown_tree(home, SHELL_USER)
    chown_tree(runtime, SHELL_USER)
    env = {
        **user_env(home, runtime, SHELL_USER),
        "DBUS_SYSTEM_BUS_ADDRESS": desktop_stack.bus.address,
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime / 'bus'}",
    }
    bus = SessionBus(workdir, runtime, SHELL_USER, env)
    d = Desktop(workdir, desktop_stack.bus.address, bus, env)
    try:
        bus.start()
        yield d
    finally:
        for proc in reversed(d.procs):
            h.stop_pid(proc)
        bus.stop()
        if os.environ.get("TPD_KEEP_LOGS"):
            print(f"desktop logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> str:
    def found() -> str | None:
        content = log.read_text(errors="replace")
        if proc.poll() is not None and text not in content:
            raise AssertionError(f"{log.name}: the process exited ({proc.returncode}):\n{content}")
        return next((line for line in content.splitlines() if text in line), None)

    line: str = h.wait_until(found, timeout, f"{text!r} in {log.name}")
    return line


def props_now(bus: h.PrivateBus) -> dict[str, Any] | None:
    return bus.properties() if bus.has_owner(names.BUS_NAME) else None


def expected_view(bus: h.PrivateBus) -> dict[str, Any]:
    props = props_now(bus)
    return P.present({"running": props is not None, "props": props, "nmLinks": list(NM_DEVICES)})


# --- the tray ------------------------------------------------------------------------------------


class TrayReader:
    """Reads the item and its menu the way a panel does, and clicks menu entries."""

    def __init__(self, conn: Any, service: str) -> None:
        self.conn = conn
        self.service = service

    def _call(self, path: str, iface: str, method: str, params: Any, reply: str | None) -> Any:
        result = self.conn.call_sync(
            self.service, path, iface, method, params,
            GLib.VariantType(reply) if reply else None, Gio.DBusCallFlags.NONE, 5000, None,
        )  # fmt: skip
        return result.unpack() if result is not None else None

    def item(self, name: str) -> Any:
        params = GLib.Variant("(ss)", (tray.ITEM_IFACE, name))
        return self._call(tray.ITEM_PATH, "org.freedesktop.DBus.Properties", "Get", params, "(v)")[0]

    def menu(self) -> list[tuple[int, dict[str, Any]]]:
        params = GLib.Variant("(iias)", (0, -1, []))
        _revision, (_root, _props, children) = self._call(
            tray.MENU_PATH, tray.MENU_IFACE, "GetLayout", params, "(u(ia{sv}av))"
        )
        return [(child_id, props) for child_id, props, _ in children]

    def click(self, item_id: int) -> None:
        params = GLib.Variant("(isvu)", (item_id, "clicked", GLib.Variant("i", 0), 0))
        self._call(tray.MENU_PATH, tray.MENU_IFACE, "Event", params, None)

    def activate(self) -> None:
        self._call(tray.ITEM_PATH, tray.ITEM_IFACE, "Activate", GLib.Variant("(ii)", (0, 0)), None)


def wait_tray_shows(reader: TrayReader, bus: h.PrivateBus, status: str, timeout: float = 10) -> None:
    """The menu, tooltip and icon are what the pure logic says for the daemon's properties now."""
    last: Any = None

    def ok() -> bool:
        nonlocal last
        view = expected_view(bus)
        items, _ = tray.menu_items(view)
        tooltip = reader.item("ToolTip")
        last = (reader.menu(), tooltip, reader.item("IconName"))
        return (
            view["status"] == status
            and last[0] == items
            and tooltip[2:] == (view["headerTitle"], status)
            and last[2] == view["icon"]
        )

    try:
        h.wait_until(ok, timeout, f"the tray to show {status!r}")
    except AssertionError:
        raise AssertionError(f"the tray shows {last}, expected {status!r} / {expected_view(bus)}") from None


def row_id(reader: TrayReader, text: str) -> int:
    return next(i for i, props in reader.menu() if props.get("label") == text)


def test_tray_menu_over_dbus_turns_the_proxy_off_and_on(
    desktop: Desktop, desktop_stack: DesktopStack, make_daemon: MakeDaemon
) -> None:
    bus = desktop_stack.bus
    daemon = make_daemon()
    watcher, watcher_log = desktop.start("watcher", [str(h.PYTHON), str(WATCHER), desktop.bus.address], user=h.ROOT)
    wait_log(watcher_log, "ready", watcher)
    app, app_log = desktop.start("toggle", [str(TOGGLE), "--verbose"])
    wait_log(app_log, "mode: tray", app)  # auto: a host is there
    _, path, service = wait_log(watcher_log, "registered ", watcher).split()
    assert path == tray.ITEM_PATH and service.startswith(":")  # by path, from its unique name
    conn = desktop.bus.connect()
    try:
        reader = TrayReader(conn, service)
        wait_tray_shows(reader, bus, f"active on {h.LINK_A}")
        assert reader.item("Status") == "Active" and reader.item("Menu") == tray.MENU_PATH

        reader.click(tray.MASTER_ID)  # the menu's "Proxy" entry
        h.wait_until(lambda: bus.properties()["Enabled"] is False, 10, "Enabled to become false")
        h.wait_until(lambda: daemon.netns.nft_table() == "", 10, "the nft table to disappear")
        wait_tray_shows(reader, bus, "proxy off")

        reader.activate()  # a left click on the icon flips the master switch
        h.wait_until(lambda: bus.properties()["Enabled"] is True, 10, "Enabled to become true")
        h.wait_until(lambda: "table inet tproxyd" in daemon.netns.nft_table(), 10, "the nft table")
        wait_tray_shows(reader, bus, f"active on {h.LINK_A}")

        reader.click(row_id(reader, f"{h.LINK_B} · not proxied"))  # NetworkManager's link, auto mode
        h.wait_until(lambda: bus.properties()["Links"].get(h.LINK_B) == "", 10, "EnableLink(tpdv1, '')")
        wait_tray_shows(reader, bus, f"active on {h.LINK_A} and {h.LINK_B}")

        daemon.stop()
        wait_tray_shows(reader, bus, "tproxyd is not running")
        master = dict(reader.menu())[tray.MASTER_ID]
        assert master["enabled"] is False
        daemon.start()
        wait_tray_shows(reader, bus, f"active on {h.LINK_A} and {h.LINK_B}")
    finally:
        conn.close_sync(None)


# --- the window --------------------------------------------------------------------------------


def screenshot(desktop: Desktop, name: str) -> Path:
    path = output_dir() / f"fallback-window-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    desktop.x("import", "-window", "root", str(path))
    return path


def test_window_under_xvfb_turns_the_proxy_off_and_on(
    desktop: Desktop, desktop_stack: DesktopStack, make_daemon: MakeDaemon
) -> None:
    """No tray host: a GTK 4 / libadwaita window; Space on its focused switch (XTEST key events
    from xdotool) turns the proxy off and on through tproxyd."""
    from tproxy_service.toggle.window import summary  # GTK 4: imported once the prerequisites are known

    bus = desktop_stack.bus
    daemon = make_daemon()
    desktop.start_xvfb()
    app, log = desktop.start("toggle", [str(TOGGLE), "--verbose"])
    wait_log(log, "mode: window", app)
    view = expected_view(bus)
    assert view["status"] == f"active on {h.LINK_A}"
    wait_log(log, f"drawn: {summary(view)}", app)  # the state and every row, NetworkManager's too
    window = h.wait_until(
        lambda: desktop.x("xdotool", "search", "--name", "^Transparent proxy: ") or None, 10, "the window"
    ).split()[0]
    screenshot(desktop, "active")

    mark = len(log.read_text())
    desktop.x("xdotool", "windowfocus", "--sync", window)
    desktop.x("xdotool", "key", "space")
    h.wait_until(lambda: bus.properties()["Enabled"] is False, 10, "Enabled to become false")
    h.wait_until(lambda: daemon.netns.nft_table() == "", 10, "the nft table to disappear")
    off = f"drawn: {summary(expected_view(bus))}"
    assert "proxy off" in off
    h.wait_until(lambda: off in log.read_text()[mark:], 10, "the window to show 'proxy off'")
    screenshot(desktop, "off")

    desktop.x("xdotool", "key", "space")
    h.wait_until(lambda: bus.properties()["Enabled"] is True, 10, "Enabled to become true")
    h.wait_until(lambda: "table inet tproxyd" in daemon.netns.nft_table(), 10, "the nft table")

    mark = len(log.read_text())
    daemon.stop()
    gone = f"drawn: {summary(expected_view(bus))}"
    assert "tproxyd is not running" in gone
    h.wait_until(lambda: gone in log.read_text()[mark:], 10, "the window to show 'tproxyd is not running'")
    screenshot(desktop, "not-running")
    # the window title says it too (what a task bar shows)
    assert desktop.x("xdotool", "getwindowname", window) == "Transparent proxy: tproxyd is not running"


# --- the tray in a real host: GNOME Shell with the AppIndicator extension ---------------------------

APPINDICATOR = "ubuntu-appindicators@ubuntu.com"  # Debian's gnome-shell-extension-appindicator
ICON = "Object.entries(Main.panel.statusArea).find(([k, v]) => k.startsWith('appindicator-') && v)?.[1]"


@pytest.fixture
def appindicator_shell(desktop_stack: DesktopStack) -> Iterator[Any]:
    """A headless GNOME Shell 43 whose only extension is the AppIndicator host (a real
    StatusNotifierWatcher + host, showing items in the top bar)."""
    from .shell import ShellSession

    if not Path(f"/usr/share/gnome-shell/extensions/{APPINDICATOR}/metadata.json").exists():
        pytest.skip("gnome-shell-extension-appindicator is not installed (make deps)")
    workdir = tpg_workdir()
    session = ShellSession(workdir, desktop_stack.bus.address, SHELL_USER, [], [APPINDICATOR])
    try:
        session.start()
        session.eval("Main.messageTray.getSources().forEach(s => s.destroy()); true")
        yield session
    finally:
        session.stop()
        if os.environ.get("TPD_KEEP_LOGS"):
            print(f"gnome-shell logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def test_tray_in_gnome_shell_with_the_appindicator_extension(
    appindicator_shell: Any, desktop_stack: DesktopStack, make_daemon: MakeDaemon
) -> None:
    """A real tray host: the item shows in GNOME Shell's top bar, its menu (built by the host from
    our dbusmenu) says what the pure logic says, and a pointer click on "Proxy" turns tproxyd off."""
    shell, bus = appindicator_shell, desktop_stack.bus
    assert shell.extension_info(APPINDICATOR)["state"] == 1.0
    daemon = make_daemon()
    with (shell.workdir / "toggle.log").open("wb") as out:
        app = subprocess.Popen(
            [*as_user(SHELL_USER), str(TOGGLE), "--verbose"],
            env={**shell.env(), "DBUS_SYSTEM_BUS_ADDRESS": bus.address}, cwd="/",
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        wait_log(shell.workdir / "toggle.log", "registered with the StatusNotifierWatcher", app)

        def menu_labels() -> list[str]:
            labels: list[str] = shell.eval(f"({ICON}).menu._getMenuItems().map(i => i.label ? i.label.text : '-')")
            return labels

        def expected_labels() -> list[str]:
            items, _ = tray.menu_items(expected_view(bus))
            return [props.get("label", "").replace("__", "_") for _, props in items]  # a separator: ""

        h.wait_until(lambda: shell.eval(f"Boolean({ICON})"), 15, "the item in the top bar")
        shell.click(ICON)  # the host reads the menu (GetLayout) when it opens
        h.wait_until(lambda: shell.eval(f"({ICON}).menu.isOpen"), 5, "the tray menu to open")
        try:
            h.wait_until(lambda: menu_labels() == expected_labels(), 10, "the host's menu to match")
        except AssertionError:
            raise AssertionError(f"the host shows {menu_labels()}, expected {expected_labels()}") from None
        assert menu_labels()[:2] == [f"active on {h.LINK_A}", "Proxy"]
        shell.park_pointer()
        shell.screenshot(output_dir() / "fallback-tray-gnome-appindicator.png")

        proxy_item = f"({ICON}).menu._getMenuItems().find(i => i.label && i.label.text === 'Proxy')"
        shell.click(proxy_item)
        h.wait_until(lambda: bus.properties()["Enabled"] is False, 10, "Enabled to become false")
        h.wait_until(lambda: daemon.netns.nft_table() == "", 10, "the nft table to disappear")
        # (no second click on the icon: the host takes two quick clicks for a double click = Activate)
        try:
            h.wait_until(lambda: menu_labels() == expected_labels() == ["proxy off", *expected_labels()[1:]], 10,
                         "the host's menu to say 'proxy off'")  # fmt: skip
        except AssertionError:
            raise AssertionError(f"the host shows {menu_labels()}, expected {expected_labels()}") from None
        assert shell.js_errors() == []
    finally:
        h.stop_pid(app)
