"""The core supervised through a real systemd manager: the shipped tproxyd-core.service run by a
`systemd --user` manager (as root), joined to the gateway namespace with a test drop-in; real
v2ray; tproxyd driven over a private system bus; traffic from the client namespace.

The lab's own v2ray keeps the default port; the supervised core uses CORE_PORT, so the two never
meet."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tproxy_service.bus import names

from ..integration import harness as ih
from ..integration.monitor import Monitor
from ..tproxyd_config import write_config
from . import harness as h
from .usermanager import UserManager

pytestmark = pytest.mark.root

CORE_PORT = 1013  # privileged, like the default: no local user can bind it in the core's place
UNIT = "tproxyd-core.service"
SHIPPED_UNIT = h.REPO / "systemd" / UNIT
KINDS = [(proto, family) for proto in ("tcp", "udp") for family in (4, 6)]


@dataclass
class CoreStack:
    workdir: Path
    bus: ih.PrivateBus
    manager: UserManager
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outbound: dict[str, object] | None = None  # the user config's outbound (default: freedom)

    def __post_init__(self) -> None:
        self.access = h.AccessLog(self.workdir / "core-access.log")
        self.core_log = self.workdir / "core-error.log"
        self.user_config = self.workdir / "core-user.json"

    def write_user_config(
        self, loglevel: str = "info", mark: int | None = None, dns: dict[str, object] | None = None
    ) -> None:
        outbound: dict[str, object] = self.outbound or {"tag": "direct", "protocol": "freedom", "settings": {}}
        if mark is not None:
            outbound["streamSettings"] = {"sockopt": {"mark": mark}}
        config: dict[str, object] = {
            "log": {"loglevel": loglevel, "access": str(self.access.path), "error": str(self.core_log)},
            "outbounds": [outbound],
        }
        if dns is not None:
            config["dns"] = dns
        self.user_config.write_text(json.dumps(config))

    def start(
        self,
        policy: str,
        systemd_bus: str = "",
        extra_core: dict[str, Any] | None = None,
        links: dict[str, str] | None = None,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """`extra_core`: more [core] keys."""
        self.write_user_config()
        config = write_config(
            self.workdir / "tproxyd.toml",
            self.workdir,
            runtime_dir=self.manager.runtime_dir / "tproxyd",  # %t/tproxyd in the unit
            tproxy={"port": CORE_PORT, "failure_policy": policy},
            core={
                "config": self.user_config,
                "systemd_bus": systemd_bus or self.manager.bus_address,
                **(extra_core or {}),
            },
            links=links,
        )
        log = self.workdir / "tproxyd.log"
        readies = log.read_text().count("tproxyd ready") if log.exists() else 0  # earlier runs'
        proc = h.spawn(
            h.GW,
            [str(h.TPROXYD), "--config", str(config), "--log-level", "debug"],
            log,
            env={"DBUS_SYSTEM_BUS_ADDRESS": self.bus.address},
        )
        self.daemons.append(proc)
        if not wait:
            return proc
        h.wait_until(
            lambda: log.read_text().count("tproxyd ready") > readies or proc.poll() is not None, 20, "tproxyd ready"
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        return proc

    def call(self, member: str, signature: str = "", body: list[object] | None = None) -> ih.Reply:
        return self.bus.call(member, signature, body)

    def props(self) -> dict[str, object]:
        return self.bus.properties()

    def wait_state(self, state: str, timeout: float = 10) -> None:
        h.wait_until(lambda: self.props()["State"] == state, timeout, f"State == {state!r} (now {self.props()})")

    def unit(self, prop: str) -> str:
        return self.manager.systemctl("show", "-p", prop, "--value", UNIT).strip()

    def core_starts(self) -> int:
        """v2ray logs this once per start, to its own error log."""
        try:
            return self.core_log.read_text().count("V2Ray 4.34.0 started")
        except FileNotFoundError:
            return 0


@pytest.fixture
def core_stack(lab: h.Lab, tmp_path: Path) -> Iterator[CoreStack]:
    bus_dir = ih.new_workdir()  # traversable by the unprivileged watcher
    bus = ih.PrivateBus(bus_dir)
    manager = UserManager(tmp_path / "um", f"tproxyd-test-{os.getpid()}")
    stack = CoreStack(tmp_path, bus, manager)
    try:
        bus.start()
        manager.start()
        # The shipped unit; the drop-in only places it in the gateway namespace and shows the
        # core the test's directory (its config, under the manager's runtime directory, and its
        # test logs), which lies under the /tmp that PrivateTmp= hides.
        manager.install_unit(SHIPPED_UNIT, f"[Service]\nNetworkNamespacePath=/run/netns/{h.GW}\nBindPaths={tmp_path}\n")
        yield stack
    finally:
        for proc in stack.daemons:
            h.stop_process(proc, timeout=15)
        manager.stop()
        bus.stop()
        shutil.rmtree(bus_dir, ignore_errors=True)
        h.remove_our_kernel_state(h.GW)
    assert all(p.returncode == 0 for p in stack.daemons), "tproxyd did not exit cleanly on SIGTERM"


def assert_proxied(stack: CoreStack, lab: h.Lab) -> None:
    proofs = h.Proofs(stack.access, lab.leaks)
    with lab.leaks.no_client_packets():
        for proto, family in KINDS:
            flow = h.send(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family))
            proofs.proxied(flow, expected_peer=h.GW_UP.of(family))


def assert_direct(proto: str = "tcp", family: int = 4) -> None:
    flow = h.send(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family))
    assert (flow.seen_peer, flow.seen_port) == (flow.src, flow.sport), f"not direct: {flow}"


def assert_one_core_instance() -> None:
    """v2ray sets SO_REUSEPORT: a second instance would bind the same port without error."""
    for family in ("-4", "-6"):
        listeners = h.in_ns(h.GW, "ss", "-Htln", family, f"sport = :{CORE_PORT}").stdout.splitlines()
        assert len(listeners) == 1, f"expected one core listening on {CORE_PORT} ({family}): {listeners}"


def test_enable_link_starts_the_core_and_set_enabled_false_stops_it(lab: h.Lab, core_stack: CoreStack) -> None:
    core_stack.start("open")
    props = core_stack.props()
    assert (props["State"], props["CoreState"]) == ("off", "inactive"), props
    assert core_stack.unit("ActiveState") == "inactive"
    monitor = Monitor(ih.PLAIN, core_stack.bus)  # an unprivileged watcher
    try:
        monitor.subscribed()  # a change made before its matches are in place would be missed
        assert core_stack.call("EnableLink", "ss", [h.LAN_LINK, "lan"]).error is None
        monitor.changed("CoreState", "active")
        monitor.changed("State", "active")
        states = [e["changed"]["State"] for e in monitor.events if "State" in e.get("changed", {})]
        assert states.index("starting") < states.index("active"), states  # diverted only once listening
        assert core_stack.unit("ActiveState") == "active"
        assert_proxied(core_stack, lab)
        assert_one_core_instance()

        assert core_stack.call("SetEnabled", "b", [False]).error is None
        monitor.changed("CoreState", "inactive")
        monitor.changed("State", "off")
        assert core_stack.unit("ActiveState") == "inactive"
        assert_direct()
    finally:
        monitor.stop()


def _kill_core(stack: CoreStack) -> int:
    pid = int(stack.unit("MainPID"))
    assert pid > 0, "the core has no main PID"
    os.kill(pid, signal.SIGKILL)  # units run in our PID namespace: this is the core we started
    return pid


class RestartGate:
    """Holds each restart of the core in an extra ExecStartPre that waits on a FIFO, so an outage
    lasts exactly until the test opens the gate: what is checked during it never races the
    restart timer."""

    def __init__(self, stack: CoreStack) -> None:
        self.fifo = stack.workdir / "restart-gate"
        os.mkfifo(self.fifo)
        dropin = stack.manager.unit_dir / f"{UNIT}.d" / "60-restart-gate.conf"
        dropin.write_text(f"[Service]\nExecStartPre=/bin/sh -c 'read _ < {self.fifo}'\n")
        stack.manager.systemctl("daemon-reload")

    def open(self) -> None:
        """Lets the waiting restart go on; waits (with a deadline) until it is waiting."""

        def writer() -> int | None:
            try:  # ENXIO until the unit's ExecStartPre has the FIFO open for reading
                return os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return None

        fd = h.wait_until(writer, 20, "the core's restart to wait at the gate")
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)


def start_lan_with_gated_restarts(stack: CoreStack, policy: str) -> RestartGate:
    stack.start(policy)
    assert stack.call("EnableLink", "ss", [h.LAN_LINK, "lan"]).error is None
    stack.wait_state("active")
    return RestartGate(stack)  # the first start is not held; every restart after it is


def test_sigkill_open_policy_goes_direct_then_recovers(lab: h.Lab, core_stack: CoreStack) -> None:
    gate = start_lan_with_gated_restarts(core_stack, "open")
    for round_ in range(10):
        old = _kill_core(core_stack)
        # While the core is down the diversion is withdrawn: traffic flows direct. (How fast is
        # measured in bench/, not asserted here.)
        h.wait_until(lambda: core_stack.props()["State"] == "degraded", 10, f"degraded after kill {round_}")
        assert_direct("tcp", 4)
        gate.open()
        core_stack.wait_state("active", timeout=10)
        assert int(core_stack.unit("MainPID")) not in (0, old)
        flow = h.send("tcp", h.CLI, h.CLIENT.v4, h.SERVER.v4)
        h.Proofs(core_stack.access, lab.leaks).proxied(flow, expected_peer=h.GW_UP.v4)
    assert int(core_stack.unit("NRestarts")) == 10
    assert_proxied(core_stack, lab)
    assert_one_core_instance()


_BLOCKED_PROBE = """
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
u = socket.socket(family, socket.SOCK_DGRAM); u.bind((src, 0)); u.sendto(b"outage probe", (dst, port))
t = socket.socket(family, socket.SOCK_STREAM); t.bind((src, 0)); t.settimeout(0.5)
try:
    t.connect((dst, port)); print("connected")
except TimeoutError:
    print("dropped")
except OSError as e:
    print("answered: " + e.strerror)
"""


def probe_during_outage(family: int) -> str:
    """One UDP datagram and one TCP connection attempt from the client, while the core is down."""
    args = [h.PYTHON, "-c", _BLOCKED_PROBE, h.CLIENT.of(family), h.SERVER.of(family), str(h.HTTP_PORT)]
    return h.in_ns(h.CLI, *args).stdout.strip()


def test_sigkill_closed_policy_never_leaks(lab: h.Lab, core_stack: CoreStack) -> None:
    gate = start_lan_with_gated_restarts(core_stack, "closed")
    with lab.leaks.no_client_packets():  # not one client packet reaches the router, ever
        for round_ in range(10):
            _kill_core(core_stack)
            h.wait_until(lambda: core_stack.props()["State"] == "blocked", 10, f"blocked after kill {round_}")
            for family in (4, 6):
                # Dropped, not answered: the proxy chain's final drop, not the local stack's RST.
                assert probe_during_outage(family) == "dropped"
            gate.open()
            core_stack.wait_state("active", timeout=10)
            flow = h.send("udp", h.CLI, h.CLIENT.v4, h.SERVER.v4)
            h.Proofs(core_stack.access, lab.leaks).proxied(flow, expected_peer=h.GW_UP.v4)
    assert int(core_stack.unit("NRestarts")) == 10
    assert_proxied(core_stack, lab)
    assert_one_core_instance()


def test_reload_restarts_the_core_only_when_its_config_changed(lab: h.Lab, core_stack: CoreStack) -> None:
    core_stack.start("open")
    assert core_stack.call("EnableLink", "ss", [h.LAN_LINK, "lan"]).error is None
    core_stack.wait_state("active")
    h.wait_until(lambda: core_stack.core_starts() == 1, 5, "the core's first start in its log")
    pid = core_stack.unit("MainPID")

    core_stack.write_user_config(mark=7)  # conflicts with core_mark: refused
    reply = core_stack.call("Reload")
    assert reply.error == "io.github.Tproxyd.Error.InvalidConfig" and "sockopt.mark 7" in reply.message, reply
    assert (core_stack.unit("MainPID"), core_stack.core_starts()) == (pid, 1), "a refused config touched the core"

    core_stack.user_config.write_text("{ not json")
    assert core_stack.call("Reload").error == "io.github.Tproxyd.Error.InvalidConfig"

    core_stack.write_user_config()  # the running config again: no restart
    assert core_stack.call("Reload").error is None
    assert (core_stack.unit("MainPID"), core_stack.core_starts()) == (pid, 1)

    core_stack.write_user_config(loglevel="warning")  # a real change: exactly one restart
    assert core_stack.call("Reload").error is None
    h.wait_until(lambda: core_stack.core_starts() == 2, 10, "the core restarted once")
    core_stack.wait_state("active")
    assert core_stack.unit("MainPID") != pid
    assert core_stack.call("Reload").error is None
    assert core_stack.core_starts() == 2, "an unchanged Reload restarted the core"
    assert_proxied(core_stack, lab)
    assert_one_core_instance()


def test_unreachable_systemd_manager_applies_the_failure_policy(lab: h.Lab, core_stack: CoreStack) -> None:
    proc = core_stack.start("open", systemd_bus=f"unix:path={core_stack.workdir / 'no-such-manager'}")
    assert core_stack.call("EnableLink", "ss", [h.LAN_LINK, "lan"]).error is None
    core_stack.wait_state("degraded")
    props = core_stack.props()
    assert props["CoreState"] == "unreachable", props
    assert "cannot reach the systemd manager" in str(props["LastError"]), props
    assert props["ActiveLinks"] == [], "open policy: no diversion while the core cannot run"
    assert_direct("tcp", 4)
    assert proc.poll() is None, "tproxyd must keep running without a systemd manager"


def test_core_dns_warnings_reach_the_log_the_bus_and_tproxyctl_status(lab: h.Lab, core_stack: CoreStack) -> None:
    """A core config without DNS servers of its own: tproxyd gives it its default dns section and
    says so in its log, in Warnings (with PropertiesChanged) and in `tproxyctl status`."""
    core_stack.start("open")  # the user config has no dns section
    (warning,) = core_stack.props()["Warnings"]  # type: ignore[misc]
    assert "no dns section" in warning and "1.1.1.1" in warning, warning
    assert (
        f"WARNING core config {core_stack.user_config}: {warning}" in (core_stack.workdir / "tproxyd.log").read_text()
    )
    core_json = json.loads((core_stack.manager.runtime_dir / "tproxyd" / "core.json").read_text())
    assert core_json["routing"]["rules"][0]["outboundTag"] == "tproxyd-dns" and core_json["dns"]["servers"]
    status = subprocess.run(
        [str(ih.TPROXYCTL), "status"], env={**os.environ, **core_stack.bus.env()}, capture_output=True, text=True
    )
    assert f"Warning:        {warning}" in status.stdout.splitlines(), status.stdout + status.stderr

    monitor = Monitor(ih.PLAIN, core_stack.bus)
    try:
        monitor.wait_for(lambda e: e["event"] == "initial", "the monitor's initial values (it is subscribed)")
        core_stack.write_user_config(dns={"servers": ["localhost"]})
        assert core_stack.call("Reload").error is None
        changed = monitor.wait_for(lambda e: e["event"] == "changed" and "Warnings" in e["changed"], "Warnings")
        (system,) = changed["changed"]["Warnings"]
        assert "system resolver" in system, system
        core_stack.write_user_config(dns={"servers": ["198.51.100.53"]})
        assert core_stack.call("Reload").error is None
        monitor.changed("Warnings", [])
    finally:
        monitor.stop()
    assert (
        "Warning"
        not in subprocess.run(
            [str(ih.TPROXYCTL), "status"], env={**os.environ, **core_stack.bus.env()}, capture_output=True, text=True
        ).stdout
    )


VMESS_PORT = 10086
VMESS_ID = "6e0f7d3c-1c2b-4d8e-9a41-5b7f0c2d9e11"
# The VMess server's own address toward the server: what the server sees of a chained flow.
VMESS_EGRESS = h.Addr("198.51.100.1", "2001:db8:2::1")


@pytest.fixture
def vmess_server(lab: h.Lab, tmp_path: Path) -> Iterator[None]:
    """A real v2ray VMess server on the router (the upstream namespace), dual-stack."""
    config = {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {"listen": "::", "port": VMESS_PORT, "protocol": "vmess",
             "settings": {"clients": [{"id": VMESS_ID, "alterId": 0}]}}
        ],
        "outbounds": [{"protocol": "freedom", "settings": {}}],
    }  # fmt: skip
    path = tmp_path / "vmess-server.json"
    path.write_text(json.dumps(config))
    proc = h.spawn(h.UP, [h.V2RAY, "-config", str(path)], tmp_path / "vmess-server.log")
    try:
        h.wait_listening(h.UP, {("tcp", f"*:{VMESS_PORT}")}, "the VMess server")
        yield
    finally:
        h.stop_process(proc)


def test_vmess_chain_through_a_v2ray_server_upstream(lab: h.Lab, core_stack: CoreStack, vmess_server: None) -> None:
    """A real proxy chain: the user's [core] config is a VMess client of the router's v2ray; the
    core runs under tproxyd's own supervision, and the server sees the VMess server's address."""
    core_stack.outbound = {
        "tag": "proxy",
        "protocol": "vmess",
        "settings": {
            "vnext": [{"address": h.ROUTER.v4, "port": VMESS_PORT, "users": [{"id": VMESS_ID, "alterId": 0}]}]
        },
    }
    core_stack.start("open")
    assert core_stack.call("EnableLink", "ss", [h.LAN_LINK, "lan"]).error is None
    core_stack.wait_state("active")
    proofs = h.Proofs(core_stack.access, lab.leaks)
    with lab.leaks.no_client_packets():
        for proto, family in KINDS:
            flow = h.send(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family))
            proofs.proxied(flow, expected_peer=VMESS_EGRESS.of(family))
            line = core_stack.access.line_for(flow)
            assert line is not None and line.endswith("[proxy]"), f"not through the VMess outbound: {line}"


_STREAM = """
import socket, sys, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
while True:  # until SIGTERM: one datagram every 5 ms
    s.sendto(b"stream", (dst, port))
    time.sleep(0.005)
"""


def test_closed_policy_stop_is_a_kill_switch_until_released(lab: h.Lab, core_stack: CoreStack) -> None:
    """Under `closed`, SIGTERM (systemctl stop/restart, an upgrade) keeps blocking the proxied
    links: not one client packet reaches the router while tproxyd and its core are down, nor
    while the next start takes over. DisableLink releases the link (traffic goes direct)."""
    first = core_stack.start("closed")
    assert core_stack.call("EnableLink", "ss", [h.LAN_LINK, "lan"]).error is None
    assert core_stack.call("EnableLink", "ss", [h.UP_LINK, "host"]).error is None
    core_stack.wait_state("active")
    kept = dataclasses.replace(h.kernel_state(h.GW), table_listing=h.strip_counters(h.kernel_state(h.GW).table_listing))
    streams = [
        h.spawn(
            h.CLI,
            [h.PYTHON, "-c", _STREAM, h.CLIENT.of(f), h.SERVER.of(f), str(h.UDP_PORT)],
            core_stack.workdir / f"stream{f}.log",
        )
        for f in (4, 6)
    ]
    try:
        with lab.leaks.no_client_packets():
            first.send_signal(signal.SIGTERM)
            assert first.wait(15) == 0
            now = h.kernel_state(h.GW)
            assert dataclasses.replace(now, table_listing=h.strip_counters(now.table_listing)) == kept, "all must stay"
            h.wait_until(lambda: core_stack.unit("ActiveState") == "inactive", 10, "the core to stop with tproxyd")
            for family in (4, 6):
                assert probe_during_outage(family) == "dropped"
                own = h.attempt("tcp", h.GW, h.GW_UP.of(family), h.SERVER.of(family))
                h.Proofs(core_stack.access, lab.leaks).blocked(own)
            core_stack.start("closed")  # takes over what it finds
            core_stack.wait_state("active", timeout=20)
            assert_proxied(core_stack, lab)
    finally:
        for stream in streams:
            h.stop_process(stream)
    assert core_stack.call("DisableLink", "s", [h.LAN_LINK]).error is None
    assert core_stack.call("DisableLink", "s", [h.UP_LINK]).error is None
    h.wait_until(lambda: h.kernel_state(h.GW).absent, 10, "the released table, rules and routes to be gone")
    assert_direct()


SLOW_CORE = """#!/bin/sh
# The core binary, whose config check waits until the test creates {release}.
if [ "$1" = "-test" ]; then
    touch {started}
    while [ ! -e {release} ]; do sleep 0.05; done
fi
exec /usr/bin/v2ray "$@"
"""


def test_closed_policy_blocks_before_the_slow_core_check(lab: h.Lab, core_stack: CoreStack) -> None:
    """At boot tproxyd runs before the network comes up; under `closed` its table must be in
    place before anything slow: here the core's `-test` does not end until the test says so,
    and meanwhile the configured link is already blocked (not one client packet upstream)."""
    started, release = core_stack.workdir / "test-started", core_stack.workdir / "test-release"
    binary = core_stack.workdir / "slow-core"
    binary.write_text(SLOW_CORE.format(started=started, release=release))
    binary.chmod(0o755)
    daemon = core_stack.start("closed", extra_core={"binary": binary}, links={h.LAN_LINK: "lan"}, wait=False)
    try:
        h.wait_until(lambda: started.exists() or daemon.poll() is not None, 20, "tproxyd to run the core's -test")
        assert daemon.poll() is None
        with lab.leaks.no_client_packets():
            for family in (4, 6):
                assert probe_during_outage(family) == "dropped"
        assert h.kernel_state(h.GW).complete
    finally:
        release.touch()
    h.wait_until(lambda: core_stack.bus.has_owner(names.BUS_NAME), 20, "tproxyd on the bus")
    core_stack.wait_state("active", timeout=20)
    assert_proxied(core_stack, lab)


_SQUAT = """
import socket, sys
try:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
except PermissionError:
    print("refused", flush=True); sys.exit(0)
print("bound", flush=True)
sys.stdin.read()
"""


def test_a_local_user_cannot_keep_the_core_from_listening(lab: h.Lab, core_stack: CoreStack) -> None:
    """While the core is down, a plain user tries to take its port first: a privileged port (the
    default's kind; unprivileged ones are refused unless the config allows them) cannot be taken,
    so the core still listens, becomes ready and traffic is proxied."""
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", h.GW, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-c", _SQUAT, str(CORE_PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert squatter.stdout is not None
        squatted = squatter.stdout.readline().strip()  # "bound": it now holds the port
        core_stack.start("open")
        assert core_stack.call("EnableLink", "ss", [h.LAN_LINK, "lan"]).error is None
        core_stack.wait_state("active", timeout=20)
        assert_proxied(core_stack, lab)
        assert squatted == "refused"
    finally:
        if squatter.poll() is None:
            squatter.kill()  # ours: bound the port and waits on stdin
        squatter.wait(10)
