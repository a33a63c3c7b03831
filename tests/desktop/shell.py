"""A throw-away headless GNOME Shell session for tests (docs/architecture.md, "Headless GNOME
Shell"): the host's GNOME Shell 43, or Debian 13's GNOME Shell 48 in a container (container.py),
whose commands then start with its prefix.

The shell runs as an unprivileged user (so polkit decides about it as about a person) under its
own session dbus-daemon, with every XDG directory in a temp dir, talking to the test's private
system bus. `--unsafe-mode` opens org.gnome.Shell.Eval and Screenshot to the test. Everything is
stopped by PID: the shell with Eval(Meta.exit) (SIGTERM makes it segfault), then the session bus,
then whatever the bus activated (dconf-service, ...), found by parent PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib

from tests.integration import harness as h
from tests.support import wait_until

GNOME_SHELL = "/usr/bin/gnome-shell"
SESSION_BUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <standard_session_servicedirs/>
  <policy context="default">
    <!-- the test process (root) talks to the user's session too -->
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""
POINTER = "global._tpgPointer"
# The input seat: GNOME 48 has it from the stage's context, 43 from Clutter.
SEAT = (
    "(global.stage.context?.get_backend() ?? Clutter.get_default_backend()).get_default_seat()"
    ".create_virtual_device(Clutter.InputDeviceType.POINTER_DEVICE)"
)


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (by /proc's PPid), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds `entry` exactly (e.g. this session's XDG_RUNTIME_DIR)."""
    found = []
    wanted = entry.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in env:
            found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not any(_alive(pid) for pid in pids), 5, f"processes {pids} to exit")
    except AssertionError:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class SessionBus:
    """A session dbus-daemon run as `user`, its socket in `runtime`; root may talk to it too."""

    def __init__(
        self, workdir: Path, runtime: Path, user: h.User, env: dict[str, str], prefix: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.prefix = prefix or []
        self.user = user
        self.env = env
        self.log = workdir / "session-bus.log"
        self.socket = runtime / "bus"
        self.address = f"unix:path={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "session-bus.conf"
        conf.write_text(SESSION_BUS_CONF.format(socket=self.socket))
        read_fd, write_fd = os.pipe()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *as_user(self.user), "dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile",
                 f"--print-address={write_fd}"],
                pass_fds=(write_fd,), env=self.env, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            if not r.readline().strip():
                raise AssertionError(f"session dbus-daemon did not start: {self.log.read_text()}")

    def connect(self) -> Any:
        return Gio.DBusConnection.new_for_address_sync(
            self.address,
            Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
            None,
            None,
        )

    def stop(self) -> None:
        """The bus, then whatever it activated (dconf-service, the shell's gjs helpers, ...): found by
        parent PID, and by their environment naming this session's runtime directory (some are
        re-parented to PID 1)."""
        if self.proc is not None:
            activated = _children(self.proc.pid)
            h.stop_pid(self.proc)
            _kill_pids(activated)
            self.proc = None
        _kill_pids(_pids_with_env(f"XDG_RUNTIME_DIR={self.socket.parent}"))


def as_user(user: h.User) -> list[str]:
    if user.uid == 0:
        return []
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]


def chown_tree(path: Path, user: h.User) -> None:
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), user.uid, user.gid)
    os.chown(path, user.uid, user.gid)


def user_env(home: Path, runtime: Path, user: h.User) -> dict[str, str]:
    """A desktop user's environment with every XDG directory under `home`/`runtime`."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "USER": user.name,
        "LOGNAME": user.name,
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "LIBGL_ALWAYS_SOFTWARE": "1",
        "NO_AT_BRIDGE": "1",
        "GTK_A11Y": "none",
    }


class ShellSession:
    def __init__(
        self,
        workdir: Path,
        system_bus: str,
        user: h.User,
        extensions: list[Path],
        uuids: list[str],
        version: int = 43,
        prefix: list[str] | None = None,
    ) -> None:
        """version: the shell's major version; prefix: what runs a command where that shell is."""
        self.workdir = workdir
        self.version = version
        self.prefix = prefix or []
        self.system_bus = system_bus
        self.user = user
        self.extensions = extensions
        self.uuids = uuids
        self.home = workdir / "home"
        self.runtime = workdir / "xdg-run"
        self.shots = workdir / "shots"
        self.log = workdir / "gnome-shell.log"
        self.bus = SessionBus(workdir, self.runtime, user, self.env(), self.prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None

    def env(self) -> dict[str, str]:
        return {
            **user_env(self.home, self.runtime, self.user),
            "XDG_CURRENT_DESKTOP": "GNOME",
            "XDG_SESSION_TYPE": "wayland",
            "GSETTINGS_BACKEND": "dconf",
            "DBUS_SYSTEM_BUS_ADDRESS": self.system_bus,
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime / 'bus'}",
        }

    def _gsettings(self, schema: str, key: str, value: str) -> None:
        h.run([*self.prefix, *as_user(self.user), "gsettings", "set", schema, key, value], env=self.env(), cwd="/")

    # --- lifetime -----------------------------------------------------------------------------

    def start(self) -> None:
        for d in (self.home, self.runtime, self.shots):
            d.mkdir(parents=True)
        self.runtime.chmod(0o700)
        ext_dir = self.home / ".local" / "share" / "gnome-shell" / "extensions"
        ext_dir.mkdir(parents=True)
        for source in self.extensions:
            shutil.copytree(source, ext_dir / source.name)
        for d in (self.home, self.runtime, self.shots):
            chown_tree(d, self.user)
        self.bus.start()

        quoted = ", ".join(f"'{u}'" for u in self.uuids)
        self._gsettings("org.gnome.shell", "enabled-extensions", f"[{quoted}]")
        self._gsettings("org.gnome.shell", "disable-user-extensions", "false")
        self._gsettings("org.gnome.shell", "welcome-dialog-last-shown-version", "'999'")
        self._gsettings("org.gnome.desktop.interface", "enable-animations", "false")

        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *as_user(self.user), GNOME_SHELL, "--headless", "--virtual-monitor", "1280x800",
                 "--wayland", "--no-x11", "--unsafe-mode"],
                env=self.env(), cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        h.wait_until(self._started, 90, "GNOME Shell to start")
        self._conn = self.bus.connect()
        self.eval("Main.overview.hide(); true")

    def _started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gnome-shell exited ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
        return "GNOME Shell started" in self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Meta.exit (SIGTERM segfaults the shell), then the session bus and what it activated."""
        spawned = _children(self.proc.pid) if self.proc is not None else []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(GLib.Error):  # the shell may exit before it answers
                self.eval("imports.gi.Meta.exit(imports.gi.Meta.ExitCode.SUCCESS)", timeout=5)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _kill_pids([pid for pid in spawned if _alive(pid)])  # anything the shell started itself
        if self._conn is not None:
            self._conn.close_sync(None)
            self._conn = None
        self.bus.stop()

    # --- talking to the shell -----------------------------------------------------------------

    def call(self, dest: str, path: str, iface: str, method: str, params: Any, timeout: float = 10) -> Any:
        return self._conn.call_sync(
            dest, path, iface, method, params, None, Gio.DBusCallFlags.NONE, int(timeout * 1000), None
        )

    def eval(self, code: str, timeout: float = 10) -> Any:
        """Run JS in the shell; returns its JSON-decoded value (None for undefined)."""
        params = GLib.Variant("(s)", (code,))
        reply = self.call("org.gnome.Shell", "/org/gnome/Shell", "org.gnome.Shell", "Eval", params, timeout)
        ok, result = reply.unpack()
        if not ok:
            raise AssertionError(f"Eval failed: {result}\n--- code\n{code}")
        return json.loads(result) if result else None

    def extension_info(self, uuid: str) -> dict[str, Any]:
        reply = self.call(
            "org.gnome.Shell.Extensions",
            "/org/gnome/Shell/Extensions",
            "org.gnome.Shell.Extensions",
            "GetExtensionInfo",
            GLib.Variant("(s)", (uuid,)),
        )
        info: dict[str, Any] = reply.unpack()[0]
        return info

    def screenshot(self, dest: Path) -> Path:
        """The whole screen as PNG, copied to `dest`."""
        tmp = self.shots / dest.name
        reply = self.call(
            "org.gnome.Shell.Screenshot",
            "/org/gnome/Shell/Screenshot",
            "org.gnome.Shell.Screenshot",
            "Screenshot",
            GLib.Variant("(bbs)", (False, False, str(tmp))),
        )
        ok, _ = reply.unpack()
        assert ok, f"screenshot to {tmp} failed"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp, dest)
        return dest

    def js_errors(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if "JS ERROR" in line]

    # --- a virtual pointer --------------------------------------------------------------------

    def click(self, actor_js: str, x_frac: float = 0.5, timeout: float = 5) -> None:
        """Move a Clutter virtual pointer onto the actor `actor_js` evaluates to (at x_frac of its
        width) once its place on screen is settled, wait until the actor reports the hover, then
        press and release button 1 (in one go: the place cannot change in between)."""
        where = (
            f"(() => {{ const a = {actor_js};"
            f" return [...a.get_transformed_position(), ...a.get_transformed_size()]; }})()"
        )
        last: list[Any] = []

        def settled() -> list[float] | None:
            # Quick Settings may still be laying out (e.g. NetworkManager's toggles arriving)
            nonlocal last
            now = self.eval(f"{where}.concat([({actor_js}).mapped])")
            stable = now == last and now[4]
            last = now
            return now[:4] if stable else None

        deadline = time.monotonic() + timeout
        while True:
            x, y, w, hh = h.wait_until(settled, timeout, f"{actor_js} to settle", interval=0.05)
            self.eval(
                f"const {{Clutter, GLib}} = imports.gi;"
                f"{POINTER} = {POINTER} || {SEAT};"
                f"{POINTER}.notify_absolute_motion(GLib.get_monotonic_time(), {x + w * x_frac}, {y + hh / 2}); true"
            )
            h.wait_until(lambda: self.eval(f"({actor_js}).hover"), timeout, f"the pointer over {actor_js}")
            if self.eval(where) == [x, y, w, hh]:
                break
            assert time.monotonic() < deadline, f"{actor_js} keeps moving"
        self.eval(
            f"const {{Clutter, GLib}} = imports.gi; const t = GLib.get_monotonic_time();"
            f"{POINTER}.notify_button(t, Clutter.BUTTON_PRIMARY, Clutter.ButtonState.PRESSED);"
            f"{POINTER}.notify_button(t + 50000, Clutter.BUTTON_PRIMARY, Clutter.ButtonState.RELEASED); true"
        )

    def park_pointer(self) -> None:
        """Move the pointer to an empty spot of the screen (no hover highlight in screenshots)."""
        self.eval(
            f"const {{Clutter, GLib}} = imports.gi;"
            f"{POINTER} = {POINTER} || {SEAT};"
            f"{POINTER}.notify_absolute_motion(GLib.get_monotonic_time(), 300, 700); true"
        )
