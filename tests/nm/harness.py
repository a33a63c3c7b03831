"""NetworkManager tier harness: a real NetworkManager confined in a namespace sandbox, on a private
system bus started inside that sandbox (so the bus-activated nm-dispatcher runs there too), with
tproxyd next to it, a real v2ray core and real traffic. Every name starts with `tpn-`.

    tpn-cli-* --- tpn-gw-* (NetworkManager, tproxyd, v2ray, dbus-daemon) --- tpn-up-* (router + server)
    10.42.7.2      tpnv2: NM connection "tpn-hotspot" (shared, 10.42.7.1/24) or "tpn-plain"
                   tpnv0: NM connection "tpn-cafe" 203.0.113.1/24, default route metric 100   tpnu0 .2
                   tpnm0: static 192.0.2.1/24, default route metric 500, unmanaged by NM      tpnu1 .2
                                                                  server 198.51.100.2 on tpn-up's lo

With "tpn-cafe" up, the gateway's own traffic to the server leaves via tpnv0 (so a `host` policy
on it diverts it to the core); with it down, the traffic falls back to tpnm0 and goes direct.

The sandbox (docs/architecture.md, "NetworkManager confined in a network namespace"): `unshare
--mount --uts --pid --fork --mount-proc` inside the gateway's netns, /sys read-only, a tmpfs on
/run, test directories bind-mounted over NetworkManager's paths and /etc/resolv.conf, `mount -n`
everywhere. Its PID 1 is a shell that starts the bus and reaps orphans; NetworkManager and tproxyd
join it with nsenter (NetworkManager identifies its callers by PID, so they must share its PID
namespace). Killing the sandbox's `unshare` kills the PID namespace and everything in it
(dnsmasq, nm-dispatcher, activated services): nothing can outlive a test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tests.e2e import harness as e2e
from tests.e2e.firewalld import BUS_POLICY as FIREWALLD_BUS_POLICY
from tests.integration.harness import BUS_CONF, plain  # the same system-like bus, one more socket
from tests.networkmanager_conf import networkmanager_conf
from tests.tproxyd_config import write_config
from tproxy_service.bus import names
from tproxy_service.bus.call import method_call

REPO = Path(__file__).resolve().parents[2]
TPROXYD = REPO / ".venv" / "bin" / "tproxyd"
DISPATCHER_SCRIPT = REPO / "nm-dispatcher" / "90-tproxyd"
SHIPPED_BUS_POLICY = REPO / "dbus" / "io.github.Tproxyd.conf"
NETWORKMANAGER = Path("/usr/sbin/NetworkManager")
NMCLI = Path("/usr/bin/nmcli")
NM_DISPATCHER = Path("/usr/lib/NetworkManager/nm-dispatcher")
SYSTEM_BUS_POLICIES = Path("/usr/share/dbus-1/system.d")
NM_BUS_POLICIES = ("org.freedesktop.NetworkManager.conf", "nm-dispatcher.conf", "org.freedesktop.login1.conf")
NM_DISPATCHER_SERVICE = Path("/usr/share/dbus-1/system-services/org.freedesktop.nm_dispatcher.service")
INSIDE_BUS = "unix:path=/run/dbus/system_bus_socket"  # the sandbox's bus, as seen inside it
INSIDE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DBUS_SYSTEM_BUS_ADDRESS": INSIDE_BUS}

CAFE_LINK, FALLBACK_LINK, HOT_LINK = "tpnv0", "tpnm0", "tpnv2"
GW_CAFE, ROUTER_CAFE = "203.0.113.1", "203.0.113.2"
GW_FALLBACK, ROUTER_FALLBACK = "192.0.2.1", "192.0.2.2"
HOTSPOT_GW, CLIENT = "10.42.7.1", "10.42.7.2"
SERVER = e2e.SERVER.v4  # 198.51.100.2: also where the core's marker inbound forwards to
HTTP_PORT = e2e.HTTP_PORT
CAFE, HOTSPOT, PLAIN = "tpn-cafe", "tpn-hotspot", "tpn-plain"

# PID 1 of the sandbox. `wait` keeps the shell (which reaps every orphan) as the namespace's init.
SANDBOX_INIT = r"""
set -e
W="$1"; FD="$2"
mount -n -o remount,bind,ro /sys
mount -n -t tmpfs -o mode=755,size=64m tpn-run /run
mkdir -p /run/NetworkManager /run/dbus
mount -n --bind "$W/etc-nm" /etc/NetworkManager
mount -n --bind "$W/var-lib-nm" /var/lib/NetworkManager
mount -n --bind "$W/dispatcher.d" /usr/lib/NetworkManager/dispatcher.d
mount -n --bind "$W/empty" /usr/lib/NetworkManager/conf.d
mount -n --bind "$W/resolv.conf" /etc/resolv.conf
hostname tpn-sandbox
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/dbus/system_bus_socket
dbus-daemon --config-file="$W/bus/bus.conf" --nofork --nopidfile --print-address="$FD" &
wait "$!"
"""

wait_until = e2e.wait_until
run = e2e.run
in_ns = e2e.in_ns


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def session_alive(sid: int) -> bool:
    """Is any process of session `sid` (a script and what it left in the background) alive?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            return True
    return False


# --- D-Bus from the test process -------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    error: str | None
    body: list[Any]


class Bus:
    """Calls on the sandbox's bus through its outside socket (one connection per call)."""

    def __init__(self, socket_path: Path) -> None:
        self.address = f"unix:path={socket_path}"

    async def _call(self, msg: Message, timeout: float) -> Reply:
        bus = await MessageBus(bus_address=self.address).connect()
        try:
            reply = await asyncio.wait_for(bus.call(msg), timeout)
        finally:
            bus.disconnect()
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            return Reply(reply.error_name, list(reply.body))
        return Reply(None, plain(list(reply.body)))

    def call(self, message: Message, timeout: float = 20) -> Reply:
        return asyncio.run(self._call(message, timeout))

    def has_owner(self, name: str) -> bool:
        reply = self.call(method_call(names.DBUS_NAME, names.DBUS_PATH, names.DBUS_IFACE, "NameHasOwner", "s", [name]))
        return bool(reply.body and reply.body[0])

    def tproxyd(self, member: str, signature: str = "", body: list[Any] | None = None) -> Reply:
        return self.call(method_call(names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, member, signature, body))

    def nm_property(self, name: str) -> Reply:
        """A property of NetworkManager's main object (its interface org.freedesktop.NetworkManager)."""
        return self.call(
            method_call(names.NM_NAME, names.NM_PATH, names.PROPERTIES_IFACE, "Get", "ss", [names.NM_IFACE, name])
        )

    def properties(self) -> dict[str, Any]:
        reply = self.call(
            method_call(names.BUS_NAME, names.OBJECT_PATH, names.PROPERTIES_IFACE, "GetAll", "s", [names.MANAGER_IFACE])
        )
        assert reply.error is None, reply
        return dict(reply.body[0])


class BusMonitor:
    """`busctl monitor --json=short` on the sandbox's bus: every message, parsed, in order."""

    def __init__(self, bus: Bus, log: Path) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            ["busctl", f"--address={bus.address}", "monitor", "--json=short"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                message = json.loads(line)
                with self._lock:
                    self.messages.append(message)

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def stop(self) -> None:
        e2e.stop_process(self.proc)  # type: ignore[arg-type]
        self._reader.join(5)
        self._log.close()


# --- the sandbox -------------------------------------------------------------------------------------


class Inside:
    """A program started in the sandbox with nsenter, which forks it into the PID namespace and
    waits for it: `pid` is the program's PID as the host sees it."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
        self.proc = proc
        self.what = what
        self.log = log
        self.pid = wait_until(lambda: self._child(), 10, f"{what} to start in the sandbox")

    def _child(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"nsenter for {self.what} exited with {self.proc.returncode}")
        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self) -> None:
        """Fails, showing the end of its log, once the program has exited."""
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(f"{self.what} exited:\n{tail}")

    def send(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)
            if sig == signal.SIGCONT:
                # nsenter stops itself when the program stops and stays stopped until continued
                # itself: it would never reap the program, and stop() would wait for it in vain.
                os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal the program and wait for it (SIGKILL after `timeout`)."""
        if self.alive():
            self.send(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.proc.wait(timeout)
                raise AssertionError(f"{self.what} did not exit within {timeout:g}s of signal {sig}") from None
        return self.proc.returncode


class Sandbox:
    def __init__(self, workdir: Path, netns: str) -> None:
        self.dir = workdir / "sandbox"
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.bus = Bus(self.dir / "bus" / "system_bus_socket")

    @property
    def dispatcher_dir(self) -> Path:
        return self.dir / "dispatcher.d"

    @property
    def services_dir(self) -> Path:
        return self.dir / "bus" / "services"

    @property
    def log(self) -> Path:
        return self.dir / "sandbox.log"

    def start(self) -> None:
        d = self.dir
        for sub in ("etc-nm/conf.d", "etc-nm/system-connections", "etc-nm/dispatcher.d", "var-lib-nm", "empty",
                    "dispatcher.d", "bus/system.d", "bus/services"):  # fmt: skip
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "var-lib-nm").chmod(0o700)
        (d / "resolv.conf").write_text("# private resolv.conf of the NetworkManager sandbox\n")
        (d / "etc-nm" / "NetworkManager.conf").write_text(networkmanager_conf([FALLBACK_LINK]))
        (d / "bus" / "bus.conf").write_text(
            BUS_CONF.format(dir=d / "bus", extra_listen=f"\n  <listen>{INSIDE_BUS}</listen>")
        )
        for policy in NM_BUS_POLICIES:
            shutil.copy(SYSTEM_BUS_POLICIES / policy, d / "bus" / "system.d")
        shutil.copy(SHIPPED_BUS_POLICY, d / "bus" / "system.d")
        if FIREWALLD_BUS_POLICY.exists():  # so a test can run firewalld beside NetworkManager
            shutil.copy(FIREWALLD_BUS_POLICY, d / "bus" / "system.d")
        # Without systemd the bus execs nm-dispatcher itself (SystemdService= would be ignored anyway).
        service = NM_DISPATCHER_SERVICE.read_text()
        (self.services_dir / NM_DISPATCHER_SERVICE.name).write_text(
            "\n".join(line for line in service.splitlines() if not line.startswith("SystemdService=")) + "\n"
        )
        # The shipped hook, installed the way `make install` does: root-owned, 0755.
        installed = self.dispatcher_dir / DISPATCHER_SCRIPT.name
        shutil.copy(DISPATCHER_SCRIPT, installed)
        installed.chmod(0o755)
        read_fd, write_fd = os.pipe()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns,
                 "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "--propagation", "private", "--", "bash", "-c", SANDBOX_INIT, "tpn-sandbox", str(d), str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=dict(INSIDE_ENV),
            )  # fmt: skip
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            printed = r.readline().strip()  # the bus prints its addresses once it listens
        if not printed:
            raise AssertionError(f"the sandbox's dbus-daemon did not start:\n{self.log.read_text()}")
        self.init_pid = wait_until(lambda: children(self.proc.pid) if self.proc else None, 5, "the sandbox's init")[0]

    def _nsenter(self, args: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--uts", "--pid", "--net", "--", *args]

    def spawn(self, args: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> Inside:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                self._nsenter(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={**INSIDE_ENV, **(env or {})},
            )
        return Inside(proc, what, log)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        what = f"in the sandbox: {' '.join(args)}"
        return run(*self._nsenter(list(args)), check=check, timeout=timeout, env=dict(INSIDE_ENV), what=what)

    def processes(self) -> list[tuple[int, str]]:
        """(host PID, command line) of everything running in the sandbox's PID namespace (what
        nsenter started is not a descendant of its init, so look at every process's namespace)."""
        ours = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns" / "pid") == ours:
                        found.append((int(entry.name), cmdline(int(entry.name))))
        return found

    def stop(self) -> None:
        # unshare ignores SIGTERM while it waits; SIGKILL makes it kill the namespace's init
        # (--kill-child), and the kernel then kills everything else in the PID namespace.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.init_pid:
            wait_until(lambda: gone(self.init_pid), 10, "the sandbox's PID namespace to die")


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


# --- NetworkManager -------------------------------------------------------------------------------


class NetworkManager:
    def __init__(self, sandbox: Sandbox, log: Path) -> None:
        self.sandbox = sandbox
        self.log = log
        self.proc: Inside | None = None

    def start(self) -> None:
        assert self.proc is None or not self.proc.alive(), "NetworkManager is already running"
        self.proc = self.sandbox.spawn([str(NETWORKMANAGER), "--debug"], self.log, "NetworkManager")
        wait_until(self._started, 20, "NetworkManager to own its name and finish starting")

    def _started(self) -> bool:
        assert self.proc is not None
        self.proc.assert_alive()
        bus = self.sandbox.bus
        if not bus.has_owner(names.NM_NAME):
            return False
        reply = bus.nm_property("Startup")
        return reply.error is None and reply.body[0] is False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            wait_until(lambda: not self.sandbox.bus.has_owner(names.NM_NAME), 10, "NetworkManager's name released")

    def kill(self) -> None:
        assert self.proc is not None and self.proc.alive()
        self.proc.stop(signal.SIGKILL)

    def nmcli(self, *args: str, timeout: float = 60) -> str:
        return self.sandbox.run(str(NMCLI), "--wait", "20", *args, timeout=timeout).stdout

    def add_connection(self, name: str, link: str, *settings: str) -> None:
        self.nmcli("connection", "add", "type", "ethernet", "ifname", link, "con-name", name,
                   "autoconnect", "no", "ipv6.method", "disabled", *settings)  # fmt: skip

    def up(self, name: str) -> None:
        self.nmcli("connection", "up", name)

    def down(self, name: str) -> None:
        self.nmcli("connection", "down", name)

    def sleep(self, asleep: bool) -> None:
        self.sandbox.run("busctl", "call", names.NM_NAME, names.NM_PATH, names.NM_IFACE, "Sleep", "b",
                         "true" if asleep else "false")  # fmt: skip

    def active(self) -> dict[str, str]:
        """connection name -> device of the active connections."""
        out = self.nmcli("-t", "-f", "NAME,DEVICE", "connection", "show", "--active")
        return dict(line.rsplit(":", 1) for line in out.splitlines() if line)  # type: ignore[misc]


# --- tproxyd --------------------------------------------------------------------------------------


# The policies most tests use: the café connection is proxied as `host`, any shared one as `lan`.
POLICIES: tuple[dict[str, Any], ...] = ({"id": CAFE, "mode": "host"}, {"shared": True, "mode": "lan"})


class Tproxyd:
    def __init__(self, sandbox: Sandbox, workdir: Path) -> None:
        self.sandbox = sandbox
        self.workdir = workdir
        self.config = workdir / "tproxyd.toml"
        self.log = workdir / "tproxyd.log"
        self.proc: Inside | None = None

    def write_config(
        self,
        policies: Sequence[Mapping[str, Any]] = POLICIES,
        links: dict[str, str] | None = None,
        nm: bool = True,
        core_config: Path | None = None,
        bypass: Mapping[str, Any] | None = None,
    ) -> None:
        """`policies`: the [[networkmanager.auto]] entries."""
        write_config(
            self.config,
            self.workdir,
            tproxy={
                "port": e2e.TPROXY_PORT,
                "mark": e2e.FWMARK,
                "core_mark": e2e.CORE_MARK,
                "route_table": e2e.ROUTE_TABLE,
                "failure_policy": "open",
            },
            bypass=bypass,
            # The test runs its own v2ray; tproxyd treats it as always ready. `config` is what
            # Core(generated=...) runs.
            core={"supervise": False, **({"config": core_config} if core_config else {})},
            networkmanager={"enabled": nm},
            policies=policies,
            links=links,
        )

    def start(self) -> None:
        if not self.config.exists():
            self.write_config()
        with self.log.open("a") as log:
            log.write("--- start\n")
        self.proc = self.sandbox.spawn([str(TPROXYD), "--config", str(self.config)], self.log, "tproxyd")
        wait_until(self._ready, 30, "tproxyd to own its name and finish its first reconcile")

    def _ready(self) -> bool:
        assert self.proc is not None
        self.proc.assert_alive()
        bus = self.sandbox.bus
        return bus.has_owner(names.BUS_NAME) and bus.properties()["State"] != "starting"

    def stop(self) -> int:
        assert self.proc is not None
        rc = self.proc.stop()
        wait_until(lambda: not self.sandbox.bus.has_owner(names.BUS_NAME), 10, "tproxyd's name released")
        return rc

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 10, after: int = 0) -> None:
        wait_until(lambda: needle in self.log_text()[after:], timeout, f"{needle!r} in tproxyd's log {self.log}")

    def active_links(self) -> list[str]:
        return list(self.sandbox.bus.properties()["ActiveLinks"])


# --- kernel state ---------------------------------------------------------------------------------


def set_elements(ns: str, set_name: str) -> set[str]:
    """The elements of a set of table inet tproxyd, as text ("tpnv0", "10.42.7.0/24", ...)."""
    proc = in_ns(ns, "nft", "-j", "list", "set", "inet", "tproxyd", set_name, check=False)
    if proc.returncode != 0:
        return set()
    found: set[str] = set()
    for obj in json.loads(proc.stdout)["nftables"]:
        for elem in obj.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "prefix" in elem:
                found.add(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
            elif isinstance(elem, dict) and "range" in elem:
                found.add("-".join(elem["range"]))
            else:
                found.add(str(elem))
    return found


def table_handle(ns: str) -> int | None:
    """The table's handle: a rebuild (delete + add) gives a new one, element updates do not."""
    proc = in_ns(ns, "nft", "-j", "list", "table", "inet", "tproxyd", check=False)
    if proc.returncode != 0:
        return None
    return next(int(o["table"]["handle"]) for o in json.loads(proc.stdout)["nftables"] if "table" in o)


# --- traffic --------------------------------------------------------------------------------------


def tcp_probe(ns: str, dst: str = SERVER, port: int = HTTP_PORT) -> e2e.Flow:
    """One HTTP request from `ns` with a known source port; the kernel picks route and source."""
    sport = e2e.next_source_port()
    url = f"http://{e2e.host_port(dst, port)}/"
    proc = in_ns(ns, "curl", "-sS", "-g", "-m", "5", "--local-port", str(sport), url, check=False)
    assert proc.returncode == 0, f"tcp :{sport} -> {dst}:{port} from {ns}: curl rc {proc.returncode}: {proc.stderr}"
    peer, peer_port = e2e._parse_peer(proc.stdout, f"tcp from {ns}")
    return e2e.Flow(ns, "tcp", "", sport, dst, port, peer, peer_port)


class Core:
    """v2ray in the gateway namespace and the verdicts on its access log."""

    def __init__(self, gw: str, workdir: Path, generated: str | None = None) -> None:
        """The lab's own v2ray config, or `generated`: a core config tproxyd made (its access log
        then is wherever that config says; `direct` needs the lab's marker inbound)."""
        self.gw = gw
        config = workdir / "v2ray.json"
        self.access = workdir / "v2ray-access.log"
        if generated is None:
            config.write_text(json.dumps(e2e.v2ray_config(self.access, workdir / "v2ray-error.log"), indent=2))
        else:
            config.write_text(generated)
            self.access = Path(json.loads(generated)["log"]["access"])
        run(e2e.V2RAY, "-test", "-config", str(config))
        self.proc = e2e.spawn(gw, [e2e.V2RAY, "-config", str(config)], workdir / "v2ray.out")
        wanted = {(p, f"{h}:{e2e.TPROXY_PORT}") for p in ("tcp", "udp") for h in ("127.0.0.1", "[::1]")}
        marker = {("tcp", f"127.0.0.1:{e2e.MARKER_PORT}")} if generated is None else set()
        e2e.wait_listening(gw, wanted | marker, "v2ray")

    def text(self) -> str:
        try:
            return self.access.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def line_for(self, flow: e2e.Flow) -> str | None:
        needle = f":{flow.sport} accepted {flow.proto}:{e2e.host_port(flow.dst, flow.dport)}"
        return next((line for line in self.text().splitlines() if needle in line), None)

    def proxied(self, flow: e2e.Flow) -> None:
        assert flow.seen_port != flow.sport, f"the server saw the client's own port: not proxied: {flow}"
        wait_until(lambda: self.line_for(flow), 5, f"the core's access-log line for {flow}")

    def direct(self, flow: e2e.Flow) -> None:
        assert flow.seen_port == flow.sport, f"the server saw another port than the client's: proxied? {flow}"
        # The core logs flows in order: once a later marker flow is in, this one would be too.
        marker = e2e.http_get(self.gw, "127.0.0.1", "127.0.0.1", e2e.MARKER_PORT)
        needle = f"127.0.0.1:{marker.sport} accepted tcp:"
        wait_until(lambda: needle in self.text(), 5, f"marker line {needle!r} in the access log")
        assert self.line_for(flow) is None, f"the flow went through the core: {self.line_for(flow)}"

    def stop(self) -> None:
        e2e.stop_process(self.proc)


# --- the whole world ------------------------------------------------------------------------------


class World:
    """Namespaces, links, the router/server, v2ray, the sandbox with its bus, and handles for
    NetworkManager and tproxyd (neither started)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.gw, self.up, self.cli = f"tpn-gw-{tag}", f"tpn-up-{tag}", f"tpn-cli-{tag}"
        self.workdir = Path(tempfile.mkdtemp(prefix="tpn-"))
        self.workdir.chmod(0o755)
        self.sandbox = Sandbox(self.workdir, self.gw)
        self.nm = NetworkManager(self.sandbox, self.workdir / "NetworkManager.log")
        self.tproxyd = Tproxyd(self.sandbox, self.workdir)
        self.core: Core | None = None
        self.server: subprocess.Popen[bytes] | None = None

    @property
    def bus(self) -> Bus:
        return self.sandbox.bus

    def build(self) -> None:
        for ns in (self.gw, self.up, self.cli):
            e2e.new_namespace(ns)
        in_ns(self.gw, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        self.add_cafe_link()
        e2e.add_veth(self.gw, FALLBACK_LINK, self.up, "tpnu1")
        e2e.add_veth(self.gw, HOT_LINK, self.cli, "tpnc0")
        e2e.add_addr(self.up, "tpnu1", f"{ROUTER_FALLBACK}/24")
        e2e.add_addr(self.up, "lo", f"{SERVER}/32")
        e2e.add_addr(self.gw, FALLBACK_LINK, f"{GW_FALLBACK}/24")
        in_ns(self.gw, "ip", "route", "add", "default", "via", ROUTER_FALLBACK, "metric", "500")
        e2e.add_addr(self.cli, "tpnc0", f"{CLIENT}/24")
        e2e.add_route(self.cli, "default", HOTSPOT_GW)
        self.server = e2e.start_peer_server(self.up, self.workdir / "server.log", (HTTP_PORT,), ())
        self.core = Core(self.gw, self.workdir)
        self.sandbox.start()

    def add_cafe_link(self) -> None:
        """The gateway's café link (down: NetworkManager brings it up) and the router's end, which
        dies with it (so this also recreates it)."""
        run("ip", "link", "add", CAFE_LINK, "netns", self.gw, "type", "veth", "peer", "name", "tpnu0", "netns", self.up)
        in_ns(self.up, "ip", "link", "set", "tpnu0", "up")
        e2e.add_addr(self.up, "tpnu0", f"{ROUTER_CAFE}/24")

    def delete_cafe_link(self) -> None:
        in_ns(self.gw, "ip", "link", "del", CAFE_LINK)

    def add_connections(self) -> None:
        """tpn-cafe (matches the host policy), tpn-hotspot (shared) and tpn-plain on the hotspot link."""
        self.nm.add_connection(CAFE, CAFE_LINK, "ipv4.method", "manual", "ipv4.addresses", f"{GW_CAFE}/24",
                               "ipv4.gateway", ROUTER_CAFE)  # fmt: skip
        self.nm.add_connection(HOTSPOT, HOT_LINK, "ipv4.method", "shared", "ipv4.addresses", f"{HOTSPOT_GW}/24")
        self.nm.add_connection(PLAIN, HOT_LINK, "ipv4.method", "manual", "ipv4.addresses", "10.42.8.1/24")

    def close(self, keep_logs: bool = False) -> list[str]:
        """Stop everything (by PID), remove the namespaces; returns problems to report."""
        problems = []
        if self.tproxyd.proc is not None and self.tproxyd.proc.alive():
            try:
                rc = self.tproxyd.stop()
                if rc != 0:
                    problems.append(f"tproxyd exited with {rc} on SIGTERM:\n{self.tproxyd.log_text()[-3000:]}")
            except AssertionError as e:
                problems.append(str(e))
        for stop in (self.sandbox.stop, *(p.stop for p in (self.core,) if p)):
            try:
                stop()
            except Exception as e:
                problems.append(f"cleanup: {e}")
        if self.server is not None:
            e2e.stop_process(self.server)
        for ns in (self.gw, self.up, self.cli):
            e2e.delete_namespace(ns)
        if problems:
            problems.append(f"(logs kept in {self.workdir})")
        elif keep_logs or os.environ.get("TPN_KEEP_LOGS"):
            print(f"NetworkManager tier: logs kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems
