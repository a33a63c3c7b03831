"""Integration harness: a private deny-by-default system bus that loads the shipped bus policy, the
real polkitd with test-owned actions and rules (private mount namespace), and the real tproxyd in a
network namespace of its own. Every name starts with `tpd-`; everything is stopped by PID.

Nothing here touches the main network namespace or /etc: polkitd sees our directories only
through bind mounts inside its own mount namespace, and test users are existing accounts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tests import support
from tests.support import wait_until as wait_until  # re-exported: the D-Bus tiers call h.wait_until
from tests.tproxyd_config import write_config
from tproxy_service.bus import names
from tproxy_service.bus.call import method_call
from tproxy_service.bus.call import plain as plain  # re-exported: the nm harness and bench use it

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
TPROXYD = VENV_BIN / "tproxyd"
TPROXYCTL = VENV_BIN / "tproxyctl"
BUSCLIENT = Path(__file__).resolve().parent / "busclient.py"
SHIPPED_BUS_POLICY = REPO / "dbus" / "io.github.Tproxyd.conf"
SHIPPED_ACTIONS = REPO / "polkit" / "io.github.Tproxyd.policy"
SHIPPED_ACTIVATION = REPO / "dbus" / "io.github.Tproxyd.service"
DEBIAN_POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
SYSTEM_ACTIONS = Path("/usr/share/polkit-1/actions")
POLKITD = Path("/usr/lib/polkit-1/polkitd")

# The granted user may do everything through this rule; the plain user gets polkit's defaults.
GRANT_RULE = """\
// test: the "daemon" account may use tproxyd without authentication
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("io.github.Tproxyd.") == 0 && subject.user == "daemon") {
        return polkit.Result.YES;
    }
});
"""
LINK_A, LINK_B = "tpdv0", "tpdv1"  # a veth pair inside the daemon's namespace
ROUTE_TABLE = 100  # tproxyd's default [tproxy] route_table


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


ROOT = User("root", 0, 0)
GRANTED = User("daemon", 1, 1)
PLAIN = User("nobody", 65534, 65534)
# A member of "netdev" in polkitd's view only (see Polkit.group_file): tests the shipped example rule.
NETDEV = User("bin", 2, 2)
EXAMPLE_RULES = REPO / "polkit" / "50-tproxyd.rules.example"


def run(args: list[str], check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    """tests.support.run with the command as one list (env, cwd... go to subprocess.run)."""
    return support.run(*args, check=check, timeout=timeout, **kw)


stop_pid = support.stop_process  # SIGTERM, then SIGKILL; only ever called on our own children


def new_workdir(prefix: str = "tpd-") -> Path:
    """A directory every test user can traverse (pytest's tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# --- D-Bus calls from the test process (as root) -------------------------------------------------


@dataclass(frozen=True)
class Reply:
    error: str | None  # None: success
    message: str
    body: list[Any]


async def _call_async(address: str, msg: Message) -> Reply:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await asyncio.wait_for(bus.call(msg), 30)
    finally:
        bus.disconnect()
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        return Reply(reply.error_name, text, [])
    return Reply(None, "", list(reply.body))


# --- the private bus ------------------------------------------------------------------------------

BUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={dir}/system_bus_socket</listen>{extra_listen}
  <servicedir>{dir}/services</servicedir>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <includedir>{dir}/system.d</includedir>
</busconfig>
"""


class PrivateBus:
    """A system-like dbus-daemon (deny by default, like Debian's system.conf) whose system.d holds
    the shipped tproxyd policy and Debian's polkit policy, nothing else."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "bus"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = f"unix:path={self.dir}/system_bus_socket"

    def start(self) -> None:
        (self.dir / "system.d").mkdir(parents=True)
        (self.dir / "services").mkdir()
        self.dir.chmod(0o755)
        (self.dir / "bus.conf").write_text(BUS_CONF.format(dir=self.dir, extra_listen=""))
        shutil.copy(SHIPPED_BUS_POLICY, self.dir / "system.d")
        shutil.copy(DEBIAN_POLKIT_BUS_POLICY, self.dir / "system.d")
        self._spawn()

    def restart(self) -> None:
        """Stop dbus-daemon and start a new one on the same socket: every connection is lost."""
        self.stop()
        self._spawn()

    def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        with (self.dir / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["dbus-daemon", f"--config-file={self.dir / 'bus.conf'}", "--nofork", "--nopidfile",
                 f"--print-address={write_fd}"],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address},  # for activated services
            )  # fmt: skip
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            printed = r.readline().strip()  # the daemon prints it once it listens
        if not printed:
            raise AssertionError(f"dbus-daemon did not start: {(self.dir / 'daemon.log').read_text()}")

    def env(self) -> dict[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

    def call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        interface: str = names.MANAGER_IFACE,
        destination: str = names.BUS_NAME,
        path: str = names.OBJECT_PATH,
    ) -> Reply:
        return asyncio.run(
            _call_async(self.address, method_call(destination, path, interface, member, signature, body))
        )

    def has_owner(self, name: str) -> bool:
        reply = self.call(
            "NameHasOwner",
            "s",
            [name],
            interface=names.DBUS_IFACE,
            destination=names.DBUS_NAME,
            path=names.DBUS_PATH,
        )
        return bool(reply.body and reply.body[0])

    def properties(self) -> dict[str, Any]:
        reply = self.call("GetAll", "s", [names.MANAGER_IFACE], interface=names.PROPERTIES_IFACE)
        assert reply.error is None, reply
        return dict(plain(reply.body[0]))

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None


class Polkit:
    """The real polkitd on the private bus. Its actions dir holds the system's actions plus the
    shipped tproxyd policy; its rules dir is ours (rules hot-reload)."""

    def __init__(self, workdir: Path, bus: PrivateBus) -> None:
        self.bus = bus
        self.actions = workdir / "polkit" / "actions"
        self.rules = workdir / "polkit" / "rules.d"
        self.log = workdir / "polkit" / "polkitd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def group_file(self) -> Path:
        """/etc/group as polkitd sees it: the real one, with NETDEV's user in group "netdev"."""
        lines = Path("/etc/group").read_text().splitlines()
        for i, line in enumerate(lines):
            fields = line.split(":")
            if fields[0] == "netdev":
                fields[3] = ",".join(filter(None, [fields[3], NETDEV.name]))
                lines[i] = ":".join(fields)
                break
        else:
            lines.append(f"netdev:x:64999:{NETDEV.name}")
        path = self.actions.parent / "group"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)
        return path

    def start(self) -> None:
        self.actions.mkdir(parents=True)
        self.rules.mkdir()
        for policy in SYSTEM_ACTIONS.glob("*.policy"):
            shutil.copy(policy, self.actions)
        shutil.copy(SHIPPED_ACTIONS, self.actions)
        (self.rules / "49-tpd-test.rules").write_text(GRANT_RULE)
        shutil.copy(EXAMPLE_RULES, self.rules / "50-tproxyd.rules")  # installed the way the file says
        for path in (self.actions.parent, self.actions, self.rules):
            path.chmod(0o755)
        # unshare and bash exec: the PID we hold is polkitd's; the mounts die with its namespace.
        # Without --no-debug polkitd logs rule loading and script errors to our log.
        script = (
            'mount -n --bind "$1" /usr/share/polkit-1/actions && mount -n --bind "$2" /etc/polkit-1/rules.d'
            ' && mount -n --bind "$3" /etc/group && exec "$4"'
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script, "polkit",
                 str(self.actions), str(self.rules), str(self.group_file()), str(POLKITD)],
                env=self.bus.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        wait_until(lambda: self._exited() or self.bus.has_owner(names.POLKIT_NAME), 15, "polkitd on the bus")
        self._exited()

    def _exited(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"polkitd exited ({self.proc.returncode}): {self.log.read_text()}")
        return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None


# --- the daemon's namespace and the daemon ---------------------------------------------------------


class Netns:
    def __init__(self, prefix: str = "tpd-") -> None:
        self.prefix = prefix
        self.name = f"{prefix}{secrets.token_hex(4)}"

    def create(self) -> None:
        run(["ip", "netns", "add", self.name])
        # No duplicate address detection: link-local addresses settle at once, so the addresses
        # (which tproxyd tracks) do not change under a test that compares kernel state.
        self.exec("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        self.exec("ip", "link", "set", "lo", "up")
        self.exec("ip", "link", "add", LINK_A, "type", "veth", "peer", "name", LINK_B)
        for link in (LINK_A, LINK_B):
            self.exec("ip", "link", "set", link, "up")
        self.exec("ip", "addr", "add", "192.0.2.1/30", "dev", LINK_A)
        wait_until(
            lambda: self.exec("ip", "-6", "-o", "addr", "show", "scope", "link").stdout.count("fe80::") == 2,
            5,
            "link-local addresses on the veth pair",
        )

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.name, *args], check=check)

    def nft_table(self) -> str:
        proc = self.exec("nft", "list", "table", "inet", "tproxyd", check=False)
        return proc.stdout if proc.returncode == 0 else ""

    def kernel_state(self) -> str:
        """Everything tproxyd puts in the kernel: its table, policy rules and routes."""
        parts = [self.nft_table()]
        for family in ("-4", "-6"):
            parts.append(self.exec("ip", family, "rule", "show").stdout)
            parts.append(self.exec("ip", family, "route", "show", "table", str(ROUTE_TABLE)).stdout)
        return "\n".join(parts)

    def delete(self) -> None:
        run(["ip", "netns", "del", self.name], check=False)


@dataclass
class Tproxyd:
    """tproxyd in `netns` with a config, state and runtime dir under `workdir`."""

    workdir: Path
    netns: Netns
    bus: PrivateBus
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.config = self.workdir / "config.toml"
        self.state_dir = self.workdir / "state"
        self.state_file = self.state_dir / "state.json"
        self.log = self.workdir / "tproxyd.log"

    def write_config(self, links: dict[str, str] | None = None, extra: str = "") -> None:
        # No core: the D-Bus tier is about the API; tests/e2e/test_core.py covers the supervisor.
        write_config(self.config, self.workdir, core={"supervise": False}, extra=extra, links=links)

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> None:
        """`env` adds to (or overrides) the bus's environment, e.g. NOTIFY_SOCKET."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if not self.config.exists():
            self.write_config()
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns.name, str(TPROXYD), "--config", str(self.config)],
                env={**self.bus.env(), **(env or {})}, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        if wait:
            self.wait_ready()

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"tproxyd exited ({self.proc and self.proc.returncode}):\n{self.log.read_text()}")
        if not self.bus.has_owner(names.BUS_NAME):
            return False
        return bool(self.bus.properties()["State"] != "starting")

    def wait_ready(self, timeout: float = 20) -> None:
        wait_until(self._ready, timeout, "tproxyd to own its name and finish its first reconcile")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
                raise AssertionError(f"tproxyd did not exit within {timeout}s of signal {sig}") from None
        # The bus notices the closed connection asynchronously.
        wait_until(lambda: not self.bus.has_owner(names.BUS_NAME), 10, "the name to be released")
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert match, status
        return int(match.group(1))

    def state_json(self) -> str | None:
        try:
            return self.state_file.read_text()
        except FileNotFoundError:
            return None


# --- running things as other users -----------------------------------------------------------------


def as_user(
    user: User, args: list[str], env: dict[str, str], timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = [] if user.uid == 0 else ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
    return subprocess.run(
        [*prefix, *args],
        env={**env, "HOME": "/nonexistent" if user.uid else "/root"},
        cwd="/",
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def user_popen(
    user: User, args: list[str], env: dict[str, str], stdin: int = subprocess.DEVNULL
) -> subprocess.Popen[str]:
    prefix = [] if user.uid == 0 else ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
    return subprocess.Popen(
        [*prefix, *args],
        env={**env, "HOME": "/nonexistent"},
        cwd="/",
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- the whole stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    workdir: Path
    bus: PrivateBus
    polkit: Polkit


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """Private bus + polkitd, torn down (by PID) whatever happens."""
    workdir = new_workdir()
    bus = PrivateBus(workdir)
    polkit = Polkit(workdir, bus)
    try:
        bus.start()
        polkit.start()
        yield Stack(workdir, bus, polkit)
    finally:
        polkit.stop()
        bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def daemon_in_netns(
    bus: PrivateBus, links: dict[str, str] | None = None, extra: str = "", netns: Netns | None = None
) -> Iterator[Tproxyd]:
    """A namespace (`netns`, else a new `tpd-` one) with a veth pair and a configured (not yet
    started) tproxyd, its directory named with the namespace's prefix; cleaned up by PID."""
    netns = netns or Netns()
    workdir = new_workdir(netns.prefix)
    daemon = Tproxyd(workdir, netns, bus)
    try:
        netns.create()
        daemon.write_config(links, extra)
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            stop_pid(daemon.proc)
        netns.delete()
        if os.environ.get("TPD_KEEP_LOGS"):
            print(f"tproxyd log kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
