"""Fixtures for the desktop tier: the GNOME Shell extensions in a real headless GNOME Shell 43 (the
host's) and 48 (Debian 13's, in a container: container.py) and the `tproxyd-toggle` fallback, all
driving the real tproxyd through the real polkitd on a private system bus
(tests/integration/harness.py), with a python-dbusmock NetworkManager beside it.

Names: namespaces `tpg-*`, directories under mkdtemp("tpg-"). Every process is stopped by PID in
a finally, and the session checks that it left the machine as it found it.
(Skips become failures under TPROXYD_REQUIRE_ALL=1: see tests/conftest.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import support
from tests.integration import harness as h
from tests.tproxyd_config import write_config

if TYPE_CHECKING:
    from .shell import ShellSession

REPO = h.REPO
UUID = "tproxyd@tproxyd.github.io"
EXTENSIONS = REPO / "desktop" / "gnome-shell"
EXTENSION = EXTENSIONS / "45" / UUID  # GNOME 45 and later: ES modules
# GNOME 43 and 44: legacy imports; make_legacy.py writes it from the ES modules and these
# hand-written files (extension.js, metadata.json, stylesheet.css), as `make install` does.
LEGACY_SOURCES = EXTENSIONS / "43" / UUID
MAKE_LEGACY = EXTENSIONS / "make_legacy.py"
# The shells the toggle is tested in: their major versions (43: the legacy extension, 48: the ES one).
SHELL_VERSIONS = (43, 48)
CASES = REPO / "desktop" / "tests" / "presentation_cases.json"
SHELL_USER = h.GRANTED  # uid 1 "daemon": allowed by the test's polkit rule, like a user in netdev
NM_POLICY = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root"><allow own="org.freedesktop.NetworkManager"/></policy>
  <policy context="default"><allow send_destination="org.freedesktop.NetworkManager"/></policy>
</busconfig>
"""
NM_DEVICES = ("lo", h.LINK_A, h.LINK_B)  # what the mocked NetworkManager reports
NM_MOCK_IFACE = "org.freedesktop.DBus.Mock"  # python-dbusmock's control interface


def output_dir() -> Path:
    """Where screenshots go: $TPROXYD_TEST_OUTPUT/desktop, else /tmp/tproxyd-test-output/desktop
    (not build/: `make install` removes that)."""
    base = os.environ.get("TPROXYD_TEST_OUTPUT")
    return Path(base or "/tmp/tproxyd-test-output") / "desktop"


def tpg_workdir() -> Path:
    return h.new_workdir("tpg-")


def write_legacy_extension(parent: Path) -> Path:
    """The GNOME 43/44 extension written by make_legacy.py into parent/UUID (what `make install`
    installs under GNOME 43 and 44)."""
    extension = parent / UUID
    support.run(sys.executable, str(MAKE_LEGACY), str(extension), timeout=60)
    return extension


@pytest.fixture(scope="session")
def legacy_extension(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_legacy_extension(tmp_path_factory.mktemp("legacy-extension"))


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, polkitd, setpriv)"
    tools = ("gnome-shell", "gjs", "gsettings", "dbus-daemon", "busctl", "setpriv", "nft", "ip", "Xvfb", "xdotool",
             "import", "v2ray", "unshare", "nsenter", "debootstrap")  # fmt: skip
    if missing := support.missing_tool(*tools):
        return missing
    if not h.POLKITD.exists():
        return f"{h.POLKITD} is missing (polkitd package; make deps)"
    try:
        import dbusmock  # noqa: F401
        import gi

        gi.require_version("Gtk", "4.0")
        gi.require_version("Adw", "1")
        from gi.repository import Adw, Gtk  # noqa: F401
    except (ImportError, ValueError) as e:
        return f"python3-gi with GTK 4 and libadwaita, and python-dbusmock, are needed (make deps): {e}"
    return None


prerequisites = support.prerequisites_fixture(_missing_prerequisite)


CREATED_NAMESPACES: set[str] = set()  # this session's (another run may have its own tpg- ones)


@pytest.fixture(scope="module", autouse=True)
def machine_unchanged() -> Iterator[None]:
    """Per module (other tiers may run in the same session): the main namespace (ruleset, links,
    addresses, routes, rules) and /dev/null are as before, and no namespace of ours is left."""
    before = support.main_namespace_snapshot()
    yield
    changed = support.snapshot_changes(before, support.main_namespace_snapshot())
    assert not changed, "the desktop tests changed the machine:\n" + "\n".join(changed)
    left = CREATED_NAMESPACES & set(support.netns_list())
    assert not left, f"namespaces left behind: {sorted(left)}"


# --- the private system bus with polkitd and a NetworkManager ---------------------------------------


@dataclass
class DesktopStack:
    stack: h.Stack
    nm: subprocess.Popen[bytes] | None = None

    @property
    def bus(self) -> h.PrivateBus:
        return self.stack.bus

    @property
    def polkit(self) -> h.Polkit:
        return self.stack.polkit


def _start_nm_mock(stack: h.Stack) -> subprocess.Popen[bytes]:
    (stack.bus.dir / "system.d" / "tpg-networkmanager-mock.conf").write_text(NM_POLICY)
    reply = stack.bus.call(
        "ReloadConfig", interface=h.names.DBUS_IFACE, destination=h.names.DBUS_NAME, path=h.names.DBUS_PATH
    )
    assert reply.error is None, reply
    log = (stack.workdir / "nm-mock.log").open("wb")
    proc = subprocess.Popen(
        [str(h.PYTHON), "-m", "dbusmock", "--system", "--template", "networkmanager"],
        env={**stack.bus.env(), "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    log.close()

    def owned() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"dbusmock exited: {(stack.workdir / 'nm-mock.log').read_text()}")
        if not stack.bus.has_owner("org.freedesktop.NetworkManager"):
            return False
        # dbusmock owns the name before it has loaded the template
        reply = stack.bus.call(
            "GetDevices", interface="org.freedesktop.NetworkManager",
            destination="org.freedesktop.NetworkManager", path="/org/freedesktop/NetworkManager",
        )  # fmt: skip
        return reply.error is None

    h.wait_until(owned, 20, "the mocked NetworkManager on the bus")
    for i, ifname in enumerate(NM_DEVICES):
        reply = stack.bus.call(
            "AddEthernetDevice", "ssi", [f"tpg{i}", ifname, 100], interface=NM_MOCK_IFACE,
            destination="org.freedesktop.NetworkManager", path="/org/freedesktop/NetworkManager",
        )  # fmt: skip
        assert reply.error is None, reply
    return proc


@pytest.fixture(scope="module")
def desktop_stack(prerequisites: None) -> Iterator[DesktopStack]:
    with h.stack() as stack:
        ds = DesktopStack(stack)
        try:
            ds.nm = _start_nm_mock(stack)
            yield ds
        finally:
            if ds.nm is not None:
                h.stop_pid(ds.nm)


# --- tproxyd in a tpg- namespace ---------------------------------------------------------------------


def core_down_config(daemon: h.Tproxyd, links: dict[str, str], policy: str) -> None:
    """A supervised core whose systemd manager cannot be reached: to tproxyd the core is down from
    the start, so the failure policy applies at once (State degraded for open, blocked for closed)."""
    write_config(
        daemon.config,
        daemon.workdir,
        tproxy={"failure_policy": policy},
        core={"supervise": True, "systemd_bus": f"unix:path={daemon.workdir / 'no-systemd-here'}"},
        links=links,
    )


MakeDaemon = Callable[..., h.Tproxyd]


@contextlib.contextmanager
def _daemon_in_tpg_netns(bus: h.PrivateBus, links: dict[str, str], core_down: str | None) -> Iterator[h.Tproxyd]:
    netns = h.Netns("tpg-")
    CREATED_NAMESPACES.add(netns.name)
    with h.daemon_in_netns(bus, links, netns=netns) as daemon:
        if core_down:
            core_down_config(daemon, links, core_down)
        yield daemon


@pytest.fixture
def make_daemon(desktop_stack: DesktopStack) -> Iterator[MakeDaemon]:
    """make_daemon(links={...}, core_down=None|"open"|"closed", start=True): tproxyd in a fresh
    tpg- namespace (veths tpdv0/tpdv1); stopped by PID and removed after the test."""
    with contextlib.ExitStack() as stack:

        def make(links: dict[str, str] | None = None, core_down: str | None = None, start: bool = True) -> h.Tproxyd:
            links = {h.LINK_A: "host"} if links is None else links
            daemon = stack.enter_context(_daemon_in_tpg_netns(desktop_stack.bus, links, core_down))
            if start:
                daemon.start()
            return daemon

        yield make


# --- GNOME Shell ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SHELL_VERSIONS, ids=lambda v: f"gnome{v}")
def shell(request: pytest.FixtureRequest, desktop_stack: DesktopStack) -> Iterator[ShellSession]:
    """One headless GNOME Shell per test module and version (43: the host's; 48: Debian 13's in a
    container sharing the session's directories and the private system bus at the same paths),
    the version's extension installed and enabled, running as SHELL_USER."""
    from .container import container  # needs python3-gi: imported once the prerequisites are known
    from .shell import ShellSession

    version: int = request.param
    workdir = tpg_workdir()
    with contextlib.ExitStack() as stack:
        prefix: list[str] = []
        if version == 43:
            extension = write_legacy_extension(workdir / "legacy-extension")
        else:
            extension = EXTENSION
            box_dir = tpg_workdir()
            stack.callback(shutil.rmtree, box_dir, ignore_errors=True)
            box = stack.enter_context(container(box_dir, binds=[workdir, desktop_stack.bus.dir]))
            prefix = box.prefix()
        session = ShellSession(workdir, desktop_stack.bus.address, SHELL_USER, [extension], [UUID], version, prefix)
        try:
            session.start()
            yield session
        finally:
            session.stop()
            if os.environ.get("TPD_KEEP_LOGS"):
                print(f"gnome-shell logs kept in {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def load_cases() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(CASES.read_text())
    return data
