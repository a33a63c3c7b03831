"""The Quick Settings toggle in a real headless GNOME Shell 43 (the legacy extension) and 48 (the
ES-module one, Debian 13's shell in a container), driving the real tproxyd (in a tpg- namespace,
links are veths) through the real polkitd on a private system bus. Every test runs in both.

What is on screen is read with org.gnome.Shell.Eval and compared with the Python port of the pure
module for the daemon's real properties (the port and the JS module agree on every case of the
shared table: test_presentation.py). Clicks are a Clutter virtual pointer's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gi", reason="python3-gi is needed (make deps)")
from gi.repository import GLib

from tests.integration import harness as h
from tproxy_service.bus import names
from tproxy_service.toggle import presentation as P

from .conftest import NM_DEVICES, UUID, DesktopStack, MakeDaemon, output_dir
from .shell import ShellSession

QS = "Main.panel.statusArea.quickSettings"
TOGGLE = f"{QS}.menu._grid.get_children().find(c => c.name === 'tproxyd-toggle')"
INDICATOR = f"{QS}._indicators.get_children().find(c => c.name === 'tproxyd-indicator')"
# GNOME 43's toggle has one line (`label`); 44 and later have `title` and `subtitle`.
READ = f"""(() => {{
  const t = {TOGGLE}; const ind = {INDICATOR}; const icon = ind._icon; const lines = 'subtitle' in t;
  return {{
    sensitive: t.reactive, checked: t.checked, title: lines ? t.title : null,
    status: lines ? t.subtitle : t.label, icon: t.icon_name,
    accessibleName: t.accessible_name,
    headerTitle: t.menu._headerTitle.text, headerSubtitle: t.menu._headerSubtitle.text,
    indicator: {{visible: ind.visible && icon.visible, icon: icon.icon_name,
                warning: icon.has_style_class_name('tproxyd-warning')}},
    rows: t._rows._getMenuItems().map(i => ({{text: i.label.text, on: i._switch ? i.state : null}})),
  }};
}})()"""
SHOWN_KEYS = ("sensitive", "checked", "status", "icon", "accessibleName", "headerTitle", "headerSubtitle", "indicator")


def row(name: str) -> str:
    return f"{TOGGLE}._rows._getMenuItems().find(i => i.name === 'tproxyd-link-{name}')"


def shown(shell: ShellSession) -> dict[str, Any]:
    value: dict[str, Any] = shell.eval(READ)
    return value


def expected(shell: ShellSession, running: bool, props: dict[str, Any] | None) -> dict[str, Any]:
    view = P.present({"running": running, "props": props, "nmLinks": list(NM_DEVICES)})
    out = {k: view[k] for k in SHOWN_KEYS}
    out["title"] = view["title"] if shell.version >= 44 else None
    out["rows"] = [{"text": r["text"], "on": r.get("on") if r["kind"] == "link" else None} for r in view["rows"]]
    return out


def wait_shows(shell: ShellSession, bus: h.PrivateBus, timeout: float = 10, **want: Any) -> dict[str, Any]:
    """Wait until the toggle shows what the pure logic says for the daemon's current properties
    (or for an absent daemon), and `want`'s fields on top; returns what it shows."""
    last: dict[str, Any] = {}

    def ok() -> bool:
        nonlocal last
        running = bus.has_owner(names.BUS_NAME)
        props = bus.properties() if running else None
        last = shown(shell)
        return last == expected(shell, running, props) and all(last.get(k) == v for k, v in want.items())

    try:
        h.wait_until(ok, timeout, f"the toggle to show {want or 'the daemon state'}")
    except AssertionError:
        running = bus.has_owner(names.BUS_NAME)
        raise AssertionError(
            f"the toggle shows {last}\nexpected {expected(shell, running, bus.properties() if running else None)}"
            f" + {want}"
        ) from None
    return last


@pytest.fixture
def active_daemon(shell: ShellSession, desktop_stack: DesktopStack, make_daemon: MakeDaemon) -> h.Tproxyd:
    """tproxyd with its default links, and the toggle showing it active on tpdv0."""
    daemon = make_daemon()
    wait_shows(shell, desktop_stack.bus, status=f"active on {h.LINK_A}")
    return daemon


def open_menu(shell: ShellSession) -> None:
    """Quick Settings, then the toggle's menu, with the pointer, as a person would."""
    if not shell.eval(f"{QS}.menu.isOpen"):
        shell.click(QS)
        h.wait_until(lambda: shell.eval(f"{QS}.menu.isOpen"), 5, "Quick Settings to open")
    if not shell.eval(f"{TOGGLE}.menu.isOpen"):
        shell.click(f"{TOGGLE}._menuButton")
        h.wait_until(lambda: shell.eval(f"{TOGGLE}.menu.isOpen"), 5, "the menu to open")
    # opened without animation, it still shows only once its box is opaque
    opened = f"{TOGGLE}.menu.actor.height > 0 && {TOGGLE}.menu.box.opacity === 255"
    h.wait_until(lambda: shell.eval(opened), 5, "the menu to be drawn")


def close_menus(shell: ShellSession) -> None:
    shell.eval(f"{TOGGLE}.menu.close(0); {QS}.menu.close(0); true")
    h.wait_until(lambda: not shell.eval(f"{QS}.menu.isOpen"), 5, "Quick Settings to close")


def clear_notifications(shell: ShellSession) -> None:
    shell.eval("Main.messageTray.getSources().forEach(s => s.destroy()); true")


def notifications(shell: ShellSession) -> list[list[str]]:
    value: list[list[str]] = shell.eval(
        # GNOME 43's notifications have bannerBodyText, 48's a body
        "Main.messageTray.getSources().flatMap(s => s.notifications.map(n => [n.title, n.bannerBodyText ?? n.body]))"
    )
    return value


def screenshot(shell: ShellSession, name: str) -> Path:
    """The open menu, pointer parked, after the shell has drawn it: gnome-shell-NAME.png for GNOME 43
    (as before), gnome-shell-48-NAME.png for 48."""
    shell.park_pointer()
    shell.eval("global.stage.queue_redraw(); true")
    version = "" if shell.version == 43 else f"{shell.version}-"
    return shell.screenshot(output_dir() / f"gnome-shell-{version}{name}.png")


@pytest.fixture(autouse=True)
def clean_shell(shell: ShellSession) -> Iterator[None]:
    """Each test starts with menus closed and no notifications, and adds no JS ERROR to the log."""
    close_menus(shell)
    clear_notifications(shell)
    errors = len(shell.js_errors())
    yield
    assert shell.js_errors()[errors:] == []
    close_menus(shell)


def extension_settled(shell: ShellSession) -> dict[str, Any]:
    """GetExtensionInfo once the load is over: ENABLED (1), or an error message. While an extension
    loads, GNOME 48 can briefly report state 3 (ERROR) with an empty `error`: not final."""

    def final() -> dict[str, Any] | None:
        info = shell.extension_info(UUID)
        return info if info["state"] == 1.0 or info.get("error") else None

    info: dict[str, Any] = h.wait_until(final, 20, f"{UUID} to be enabled or to fail")
    return info


def test_extension_loads_enabled_without_js_errors(shell: ShellSession, desktop_stack: DesktopStack) -> None:
    assert f"Running GNOME Shell (using mutter {shell.version}." in shell.log.read_text(errors="replace")
    info = extension_settled(shell)
    assert info["state"] == 1.0, info  # ENABLED
    assert not info.get("error"), info
    assert shell.js_errors() == []
    # one toggle, one top-bar indicator
    assert shell.eval(f"{QS}.menu._grid.get_children().filter(c => c.name === 'tproxyd-toggle').length") == 1
    assert shell.eval(f"{QS}._indicators.get_children().filter(c => c.name === 'tproxyd-indicator').length") == 1


def test_disable_and_enable_at_runtime(shell: ShellSession, desktop_stack: DesktopStack) -> None:
    """Disabling removes the toggle and the top-bar icon (and stops watching the bus); enabling
    brings them back, showing the current state."""

    def counts() -> list[int]:
        value: list[int] = shell.eval(
            f"[{QS}.menu._grid.get_children().filter(c => c.name === 'tproxyd-toggle').length,"
            f" {QS}._indicators.get_children().filter(c => c.name === 'tproxyd-indicator').length]"
        )
        return value

    for method, want in (("DisableExtension", [0, 0]), ("EnableExtension", [1, 1])):
        shell.call(
            "org.gnome.Shell.Extensions", "/org/gnome/Shell/Extensions", "org.gnome.Shell.Extensions", method,
            GLib.Variant("(s)", (UUID,)),
        )  # fmt: skip
        h.wait_until(lambda w=want: counts() == w, 10, f"{method} to take effect")
    assert extension_settled(shell)["state"] == 1.0
    wait_shows(shell, desktop_stack.bus, status="tproxyd is not running")


def test_toggle_shows_the_daemon_state(
    shell: ShellSession, desktop_stack: DesktopStack, make_daemon: MakeDaemon
) -> None:
    make_daemon()
    now = wait_shows(shell, desktop_stack.bus, status=f"active on {h.LINK_A}", checked=True, sensitive=True)
    assert now["indicator"] == {"visible": True, "icon": P.ICONS["active"], "warning": False}
    # configured link with its mode, then the NetworkManager link that is not configured (lo skipped)
    assert now["rows"] == [
        {"text": f"{h.LINK_A} · host · proxied", "on": True},
        {"text": f"{h.LINK_B} · not proxied", "on": False},
    ]


def test_click_flips_enabled_and_the_kernel_follows(
    shell: ShellSession, desktop_stack: DesktopStack, active_daemon: h.Tproxyd
) -> None:
    bus, daemon = desktop_stack.bus, active_daemon
    assert "table inet tproxyd" in daemon.netns.nft_table()

    shell.click(QS)
    h.wait_until(lambda: shell.eval(f"{QS}.menu.isOpen"), 5, "Quick Settings to open")
    shell.click(TOGGLE, x_frac=0.25)
    h.wait_until(lambda: bus.properties()["Enabled"] is False, 10, "Enabled to become false in tproxyd")
    h.wait_until(lambda: daemon.netns.nft_table() == "", 10, "the nft table to disappear")
    wait_shows(shell, bus, status="proxy off", checked=False)
    assert shown(shell)["indicator"]["visible"] is False

    shell.click(TOGGLE, x_frac=0.25)
    h.wait_until(lambda: bus.properties()["Enabled"] is True, 10, "Enabled to become true in tproxyd")
    h.wait_until(lambda: "table inet tproxyd" in daemon.netns.nft_table(), 10, "the nft table to come back")
    wait_shows(shell, bus, status=f"active on {h.LINK_A}", checked=True)
    assert (daemon.state_dir / "state.json").exists()  # the daemon saved the user's choice


def test_menu_switches_change_links(shell: ShellSession, desktop_stack: DesktopStack, active_daemon: h.Tproxyd) -> None:
    bus, daemon = desktop_stack.bus, active_daemon

    # A NetworkManager link that is not configured: one click proxies it, in auto mode.
    open_menu(shell)
    shell.click(row(h.LINK_B))
    h.wait_until(lambda: bus.properties()["Links"] == {h.LINK_A: "host", h.LINK_B: ""}, 10, "EnableLink(tpdv1, '')")
    h.wait_until(lambda: h.LINK_B in bus.properties()["ActiveLinks"], 10, "tpdv1 to be proxied")
    assert h.LINK_B in daemon.netns.nft_table()
    wait_shows(shell, bus, status=f"active on {h.LINK_A} and {h.LINK_B}")

    # A configured link's switch turns it off.
    close_menus(shell)
    open_menu(shell)
    shell.click(row(h.LINK_A))
    h.wait_until(lambda: bus.properties()["Links"] == {h.LINK_B: ""}, 10, "DisableLink(tpdv0)")
    now = wait_shows(shell, bus, status=f"active on {h.LINK_B}")
    assert now["rows"] == [
        {"text": f"{h.LINK_B} · auto · proxied", "on": True},
        {"text": f"{h.LINK_A} · not proxied", "on": False},
    ]


@pytest.mark.usefixtures("active_daemon")
def test_a_change_made_elsewhere_shows(shell: ShellSession, desktop_stack: DesktopStack) -> None:
    bus = desktop_stack.bus
    busctl = ["busctl", f"--address={bus.address}", "call", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE]
    for args, status in (
        (["SetEnabled", "b", "false"], "proxy off"),
        (["SetEnabled", "b", "true"], f"active on {h.LINK_A}"),
        (["EnableLink", "ss", h.LINK_B, "lan"], f"active on {h.LINK_A} and {h.LINK_B}"),
    ):
        h.run([*busctl, *args])
        # A generous deadline: the extension follows PropertiesChanged (it never polls), so this
        # proves the change arrives; how fast is bench/'s to measure.
        h.wait_until(lambda s=status: shown(shell)["status"] == s, 15, f"'{status}' after busctl {args}")
    wait_shows(shell, bus, status=f"active on {h.LINK_A} and {h.LINK_B}")


def test_daemon_stop_and_restart(shell: ShellSession, desktop_stack: DesktopStack, active_daemon: h.Tproxyd) -> None:
    bus, daemon = desktop_stack.bus, active_daemon
    daemon.stop()
    now = wait_shows(shell, bus, status="tproxyd is not running", sensitive=False, checked=False)
    assert now["indicator"]["visible"] is False
    # insensitive: a click does nothing (and starts nothing)
    shell.click(QS)
    h.wait_until(lambda: shell.eval(f"{QS}.menu.isOpen"), 5, "Quick Settings to open")
    shell.eval(f"{TOGGLE}.emit('clicked', 1); true")
    assert not bus.has_owner(names.BUS_NAME)
    daemon.start()
    wait_shows(shell, bus, status=f"active on {h.LINK_A}", sensitive=True, checked=True)


def _polkit_rule_count(polkit: h.Polkit) -> int:
    lines = [line for line in polkit.log.read_text(errors="replace").splitlines() if "Finished loading" in line]
    return len(lines)


def test_access_denied_notifies_and_shows_the_true_state(
    shell: ShellSession, desktop_stack: DesktopStack, active_daemon: h.Tproxyd
) -> None:
    """polkit wants an administrator's password from the shell's user and no agent can ask for it
    here: the click becomes a notification, the toggle flips back, tproxyd and the kernel are
    unchanged. The message proves the call allowed interactive authorization: without the flag
    tproxyd answers "...: authentication is required" (gdbus shows it for the same user)."""
    bus, polkit, daemon = desktop_stack.bus, desktop_stack.polkit, active_daemon
    table = daemon.netns.nft_table()
    deny = polkit.rules / "10-tpg-deny.rules"
    loaded = _polkit_rule_count(polkit)
    deny.write_text(
        "polkit.addRule(function(action, subject) {\n"
        f'    if (action.id == "{names.ACTION_TOGGLE}" && subject.user == "{h.GRANTED.name}")\n'
        "        return polkit.Result.AUTH_ADMIN;\n"
        "});\n"
    )
    try:
        h.wait_until(lambda: _polkit_rule_count(polkit) > loaded, 15, "polkitd to load the deny rule")
        shell.click(QS)
        h.wait_until(lambda: shell.eval(f"{QS}.menu.isOpen"), 5, "Quick Settings to open")
        shell.click(TOGGLE, x_frac=0.25)
        got = h.wait_until(lambda: notifications(shell), 10, "a notification")
        assert got == [["Could not turn the proxy off", "not authorized to toggle tproxyd (polkit)"]]
        # the same user without interactive authorization (gdbus's default) gets the other answer
        method = f"{names.MANAGER_IFACE}.SetEnabled"
        gdbus = ["gdbus", "call", "--system", "--dest", names.BUS_NAME, "-o", names.OBJECT_PATH, "-m", method, "false"]
        call = h.as_user(h.GRANTED, gdbus, bus.env())
        assert "not authorized to toggle tproxyd (polkit): authentication is required" in call.stderr, call
        wait_shows(shell, bus, status=f"active on {h.LINK_A}", checked=True)
        assert bus.properties()["Enabled"] is True
        assert daemon.netns.nft_table() == table
        close_menus(shell)
        screenshot(shell, "access-denied")
    finally:
        loaded = _polkit_rule_count(polkit)
        deny.unlink()
        h.wait_until(lambda: _polkit_rule_count(polkit) > loaded, 15, "polkitd to drop the deny rule")


@pytest.mark.parametrize(
    "name, core_down, status, warning",
    [
        ("active", None, f"active on {h.LINK_A}", False),
        ("degraded", "open", "core down: traffic direct", True),
        ("blocked", "closed", "blocked: core down", True),
        ("off", None, "proxy off", False),
        ("not-running", None, "tproxyd is not running", False),
    ],
)
def test_screenshot_of_the_open_menu(
    shell: ShellSession,
    desktop_stack: DesktopStack,
    make_daemon: MakeDaemon,
    name: str,
    core_down: str | None,
    status: str,
    warning: bool,
) -> None:
    """The open menu in each state, saved under $TPROXYD_TEST_OUTPUT/desktop (/tmp/tproxyd-test-output).
    degraded/blocked: a supervised core whose systemd manager is unreachable is down to tproxyd."""
    bus = desktop_stack.bus
    if name != "not-running":
        daemon = make_daemon(core_down=core_down)
        if name == "off":
            assert bus.call("SetEnabled", "b", [False]).error is None
    now = wait_shows(shell, bus, status=status)
    assert now["indicator"]["warning"] is warning
    if core_down:
        assert bus.properties()["CoreState"] == "unreachable"
        assert "cannot reach the systemd manager" in bus.properties()["LastError"]
        # open: the diversion is withdrawn (traffic goes direct); closed: kept (traffic blocked)
        assert bus.properties()["ActiveLinks"] == ([] if core_down == "open" else [h.LINK_A])
        assert "table inet tproxyd" in daemon.netns.nft_table()
    open_menu(shell)
    path = screenshot(shell, name)
    assert png_size(path) == (1280, 800)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
