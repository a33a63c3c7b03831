"""Core start and recovery: EnableLink -> first proxied connection, and core SIGKILL -> proxied again.

The real stack of tests/e2e/test_core.py, imported from the test harnesses: a `systemd --user`
manager (tests/e2e/usermanager.py) running the shipped `systemd/tproxyd-core.service`, joined to
the gateway namespace by a drop-in; real v2ray; tproxyd driven over a private system bus
(tests/integration/harness.py). Three fresh namespaces (`tpc-*`):

  client  tpc-c0  10.93.0.2/24, default via 10.93.0.1
  gateway tpc-lan 10.93.0.1/24 (the link EnableLink'ed in `lan` mode), tpc-wan 10.94.0.1/24,
          forwarding on, 203.0.113.0/24 via 10.94.0.2; tproxyd + the core unit
  server  tpc-s0  10.94.0.2/24, 203.0.113.10/32 on lo, default via 10.94.0.1; tests/e2e/peer_server.py
          on TCP 8080 answers every HTTP GET with the peer address it saw

A prober (`--worker`) in the client namespace opens a fresh TCP connection to 203.0.113.10:8080
every ~10 ms (each with its own 1 s timeout, several in flight) and sends a GET. A connection is
*proxied* when the server names the gateway's 10.94.0.1 (v2ray's outbound), *direct* when it names
the client's 10.93.0.2. t0 is perf_counter() (CLOCK_MONOTONIC) in this process right before the
trigger; a sample ends when the first proxied reply arrives for a connection opened at or after t0.
systemd's *TimestampMonotonic properties, tproxyd's PropertiesChanged signals (stamped on
arrival) and a second worker in the gateway namespace that polls /proc/net/tcp{,6} every 2 ms for
the core's listening sockets are on the same clock and split each sample into phases.

  * start: with the core unit inactive, t0 -> EnableLink(tpc-lan, lan) -> proxied. Between
    repeats SetEnabled(false) stops the core; then DisableLink + SetEnabled(true) (nothing to
    proxy: the core stays stopped) re-arm the next EnableLink. Goal: p50 <= 1 s.
  * kill: with traffic proxied, t0 -> SIGKILL of the unit's MainPID -> proxied again (systemd's
    Restart=on-failure after RestartSec, read from the unit). Reported with the share of RestartSec.
    Kills are 0.3 s + a random 0-250 ms apart after each recovery: systemd fires the restart timer
    on a coalesced 250 ms grid, and evenly spaced kills would all hit the same phase of it.

  * idle: after the kills, with the core up and proxying and nothing changing, tproxyd's context
    switches (all threads) over --idle seconds. Goal: 0 (no readiness polling, no timers).

The unit's start limit (StartLimitBurst=30 in 60 s) is reset with `reset-failed` before each part,
so at most 25 repeats per part are allowed.

Raw samples: bench/results/core_start.json; bench/render.py makes the tables.
Run as root: .venv/bin/python bench/core_start.py [--starts 10] [--kills 10] [--policy open] [--idle 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import Report, bench_main, bench_parser, idle_wakeups, log, require_root, save_results
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tproxy_service.bus import names
from tproxy_service.model import DEFAULT_TPROXY_PORT

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import harness as e2e  # noqa: E402  (the repository root is on sys.path now)
from tests.e2e.usermanager import UserManager  # noqa: E402
from tests.integration.harness import PrivateBus, plain  # noqa: E402
from tests.tproxyd_config import write_config  # noqa: E402

MAX_REPEATS = 25  # per part; the unit's start limit is 30 starts in 60 s
UNIT = "tproxyd-core.service"
SHIPPED_UNIT = ROOT / "systemd" / UNIT
NS_PREFIX = "tpc-"
LAN, WAN = "tpc-lan", "tpc-wan"
CLIENT, GW_LAN = "10.93.0.2", "10.93.0.1"
GW_WAN, SRV_WAN = "10.94.0.1", "10.94.0.2"
SERVER, PORT = "203.0.113.10", 8080
TPROXY_PORT = DEFAULT_TPROXY_PORT
ATTEMPT_TIMEOUT = 1.0
MAX_IN_FLIGHT = 400
SETTLE = 0.3  # s of steady state after each recovery, before the next kill (plus 0-250 ms at random)
IDLE_SETTLE = 2.0  # s after the last kill's recovery before the idle window (its aftermath is done)
TIMER_ACCURACY = 0.25  # s: sd-event's default accuracy, which systemd's restart timer uses

MANAGER_IFACE, TPROXYD_PATH, TPROXYD_NAME = names.MANAGER_IFACE, names.OBJECT_PATH, names.BUS_NAME
SYSTEMD = "org.freedesktop.systemd1"
SD_MANAGER = "org.freedesktop.systemd1.Manager"
SD_UNIT = "org.freedesktop.systemd1.Unit"
SD_SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = names.PROPERTIES_IFACE


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser(
        __doc__,
        ("--starts", 10, "EnableLink -> proxied repeats"),
        ("--kills", 10, "SIGKILL -> proxied again repeats"),
        ("--interval", 10.0, "ms between connection attempts"),
        ("--idle", 60.0, "idle window in seconds (core up and proxying), 0 to skip"),
    )
    parser.add_argument("--policy", choices=("open", "closed"), default="open", help="[tproxy] failure_policy")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) for inspection")
    args = parser.parse_args(argv)
    for name in ("starts", "kills"):
        if not 1 <= getattr(args, name) <= MAX_REPEATS:
            parser.error(f"--{name} must be 1..{MAX_REPEATS} (the unit's start limit)")
    return args


# --- the workers: the prober (client namespace) and the listener watch (gateway) --------------------


async def _peer_of(reader: asyncio.StreamReader) -> str:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed before the peer line")
        match = re.match(rb"peer=(\S+) port=\d+", line)
        if match:
            return match.group(1).decode()


async def _probe(params: dict[str, Any]) -> dict[str, Any]:
    """Open a connection every `interval` s until one opened at or after t0 (read from stdin,
    once the parent has triggered) is answered through `proxied`. Prints `ready PEER` after the
    first answered connection of any kind, then one JSON line with the outcome."""
    loop = asyncio.get_running_loop()
    server, port, proxied = params["server"], params["port"], params["proxied"]
    request = f"GET / HTTP/1.0\r\nHost: {server}:{port}\r\n\r\n".encode()
    outcomes: list[tuple[float, float, str]] = []  # (opened, answered/failed, peer or error)
    state: dict[str, Any] = {"t0": None, "ready": False}
    done: asyncio.Future[tuple[float, float]] = loop.create_future()

    def check(opened: float, finished: float, outcome: str) -> None:
        t0 = state["t0"]
        if t0 is not None and opened >= t0 and outcome == proxied and not done.done():
            done.set_result((opened, finished))

    def got_t0(line: str) -> None:
        state["t0"] = float(line) if line.strip() else float("inf")
        for outcome in outcomes:
            check(*outcome)

    def read_stdin() -> None:  # a daemon thread: never holds up the exit
        line = sys.stdin.readline()
        loop.call_soon_threadsafe(got_t0, line)

    async def attempt() -> None:
        opened = time.perf_counter()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(server, port), ATTEMPT_TIMEOUT)
            writer.write(request)
            outcome = await asyncio.wait_for(_peer_of(reader), ATTEMPT_TIMEOUT)
        except TimeoutError:
            outcome = "error:timeout"
        except OSError as e:
            outcome = f"error:{type(e).__name__}"
        finally:
            if writer is not None:
                writer.close()
        finished = time.perf_counter()
        outcomes.append((opened, finished, outcome))
        if not state["ready"] and not outcome.startswith("error:"):
            state["ready"] = True
            print(f"ready {outcome}", flush=True)
        check(opened, finished, outcome)

    threading.Thread(target=read_stdin, daemon=True).start()
    tasks: set[asyncio.Task[None]] = set()
    interval = params["interval"]
    deadline = time.perf_counter() + params["timeout"]
    next_at = time.perf_counter()
    while not done.done() and time.perf_counter() < deadline:
        if len(tasks) < MAX_IN_FLIGHT:
            task = asyncio.create_task(attempt())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        next_at += interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), max(0.0, next_at - time.perf_counter()))
    for task in tasks:
        task.cancel()
    t0 = state["t0"] if state["t0"] is not None else float("inf")
    after = [o for o in outcomes if o[0] >= t0]
    kinds: dict[str, int] = {}
    for _, _, outcome in after:
        kinds[outcome] = kinds.get(outcome, 0) + 1
    direct = [finished for opened, finished, outcome in after if outcome == params["direct"]]
    result: dict[str, Any] = {"attempts": len(outcomes), "after_t0": kinds, "first_direct": min(direct, default=None)}
    if done.done():
        result["opened"], result["proxied"] = done.result()
    return result


def _listening(port: int) -> bool:
    """A TCP socket LISTENing on `port` in both /proc/net/tcp and tcp6 (this namespace's)."""
    suffix = f":{port:04X}"
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table_path) as f:
            rows = (line.split() for line in f.readlines()[1:])
            if not any(cols[1].endswith(suffix) and cols[3] == "0A" for cols in rows):
                return False
    return True


def _watch(params: dict[str, Any]) -> dict[str, Any]:
    """In the gateway namespace: poll the socket tables every `interval` s and report the first
    time, at or after t0 (from stdin), that the core's port went from not listening to listening
    for both families."""
    state: dict[str, float | None] = {"t0": None}

    def read_stdin() -> None:
        line = sys.stdin.readline()
        state["t0"] = float(line) if line.strip() else float("inf")

    threading.Thread(target=read_stdin, daemon=True).start()
    was = _listening(params["port"])
    print(f"ready {'listening' if was else 'not-listening'}", flush=True)
    rises: list[tuple[float, float]] = []  # (last poll that saw it not listening, first that did)
    deadline = time.perf_counter() + params["timeout"]
    polled = time.perf_counter()
    while time.perf_counter() < deadline:
        before = polled
        polled = time.perf_counter()
        now = _listening(params["port"])
        if now and not was:
            rises.append((before, polled))
        was = now
        t0 = state["t0"]
        if t0 is not None:
            after = [r for r in rises if r[1] >= t0]
            if after:
                return {"not_listening": after[0][0], "listening": after[0][1]}
        time.sleep(params["interval"])
    return {}


# --- the parent ----------------------------------------------------------------------------------


def mono(usec: int) -> float | None:
    """A systemd *TimestampMonotonic (µs) on perf_counter's clock (s); None when unset."""
    return usec / 1e6 if usec else None


class Observer:
    """One connection to tproxyd's bus and one to the manager's, on an asyncio loop in a thread:
    tproxyd's and the unit's PropertiesChanged are recorded with their arrival time, and calls
    to tproxyd reuse the open connection (t0 -> reply covers the call, not a bus handshake)."""

    def __init__(self, tproxyd_bus: str, manager_bus: str) -> None:
        self._addresses = (tproxyd_bus, manager_bus)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="observer", daemon=True)
        self._lock = threading.Lock()
        self.events: list[tuple[float, str, dict[str, Any]]] = []  # (arrival, "tproxyd" | "unit", changed)
        self._buses: list[Any] = []
        self._unit_path = ""

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self._run(self._connect())

    async def _connect(self) -> None:
        for address, handler in zip(self._addresses, (self._on_tproxyd, self._on_systemd), strict=True):
            bus = await MessageBus(bus_address=address).connect()
            bus.add_message_handler(handler)
            self._buses.append(bus)
        tproxyd, systemd = self._buses
        match = f"type='signal',interface='{PROPERTIES}',member='PropertiesChanged',path='{TPROXYD_PATH}'"
        await self._call(tproxyd, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                         "AddMatch", "s", [match])  # fmt: skip
        await self._call(systemd, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                         "AddMatch", "s", [f"type='signal',sender='{SYSTEMD}'"])  # fmt: skip
        await self._call(systemd, SYSTEMD, "/org/freedesktop/systemd1", SD_MANAGER, "Subscribe")
        (self._unit_path,) = await self._call(systemd, SYSTEMD, "/org/freedesktop/systemd1", SD_MANAGER,
                                              "LoadUnit", "s", [UNIT])  # fmt: skip

    @staticmethod
    async def _call(bus: Any, dest: str, path: str, iface: str, member: str, sig: str = "",
                    body: list[Any] | None = None) -> list[Any]:  # fmt: skip
        msg = Message(destination=dest, path=path, interface=iface, member=member, signature=sig, body=body or [])
        reply = await asyncio.wait_for(bus.call(msg), 30)
        if reply.message_type is MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
        return list(reply.body)

    def _record(self, source: str, changed: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((time.perf_counter(), source, {k: plain(v) for k, v in changed.items()}))

    def _on_tproxyd(self, msg: Any) -> None:
        if msg.member == "PropertiesChanged" and msg.path == TPROXYD_PATH and msg.body[0] == MANAGER_IFACE:
            self._record("tproxyd", msg.body[1])

    def _on_systemd(self, msg: Any) -> None:
        if msg.member == "PropertiesChanged" and msg.path == self._unit_path and msg.body[0] in (SD_UNIT, SD_SERVICE):
            self._record("unit", msg.body[1])

    def call(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        bus = self._buses[0]
        return list(self._run(self._call(bus, TPROXYD_NAME, TPROXYD_PATH, MANAGER_IFACE, member, signature, body)))

    def tproxyd(self) -> dict[str, Any]:
        bus = self._buses[0]
        (props,) = self._run(self._call(bus, TPROXYD_NAME, TPROXYD_PATH, PROPERTIES, "GetAll", "s", [MANAGER_IFACE]))
        return dict(plain(props))

    def unit(self) -> dict[str, Any]:
        bus = self._buses[1]
        props: dict[str, Any] = {}
        for iface in (SD_UNIT, SD_SERVICE):
            (got,) = self._run(self._call(bus, SYSTEMD, self._unit_path, PROPERTIES, "GetAll", "s", [iface]))
            props.update(plain(got))
        return props

    def first(self, source: str, prop: str, values: Sequence[Any], after: float) -> float | None:
        with self._lock:
            return next(
                (t for t, s, changed in self.events if s == source and t >= after and changed.get(prop, ()) in values),
                None,
            )

    def sequence(self, source: str, prop: str, after: float, before: float) -> list[Any]:
        with self._lock:
            return [c[prop] for t, s, c in self.events if s == source and after <= t <= before and prop in c]

    def stop(self) -> None:
        for bus in self._buses:
            self._loop.call_soon_threadsafe(bus.disconnect)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class Worker:
    """A `--worker` process in a namespace (the prober, or the listener watch); its stdout lines
    arrive through a queue. Protocol: `ready WHAT`, then t0 on its stdin, then one JSON line."""

    def __init__(self, ns: str, params: dict[str, Any]) -> None:
        self.what = params["mode"]
        argv = ["ip", "netns", "exec", ns, e2e.PYTHON, str(Path(__file__).resolve()), "--worker", json.dumps(params)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the {self.what} worker said nothing for {timeout:g} s") from None
        if line is None:
            raise RuntimeError(f"the {self.what} worker exited ({self.proc.wait()})")
        return line

    def ready(self, expected: str, timeout: float = 15) -> None:
        """Wait for `ready WHAT`: the path of the first answered connection, or whether the port listens."""
        line = self._line(timeout)
        if line != f"ready {expected}":
            raise RuntimeError(f"{self.what} worker: expected 'ready {expected}' before the trigger, got {line!r}")

    def result(self, t0: float, key: str, timeout: float = 40) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{t0!r}\n")
        self.proc.stdin.close()
        result: dict[str, Any] = json.loads(self._line(timeout))
        self.proc.wait(10)
        if key not in result:
            raise RuntimeError(f"the {self.what} worker saw no '{key}' within its timeout: {result}")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child (ip netns exec execs: the PID is the worker's)
            self.proc.wait()


@dataclass
class Lab:
    workdir: Path
    cli: str
    gw: str
    srv: str
    bus: PrivateBus
    manager: UserManager
    interval_ms: float
    observer: Observer | None = None
    tproxyd: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 15) -> Any:
        return e2e.wait_until(predicate, timeout, what)

    def state(self) -> str:
        assert self.observer is not None
        return str(self.observer.tproxyd()["State"])

    def unit_state(self) -> str:
        assert self.observer is not None
        return str(self.observer.unit()["ActiveState"])

    @contextlib.contextmanager
    def workers(self, expected_peer: str, listening: bool) -> Iterator[tuple[Worker, Worker]]:
        """The prober in the client namespace (its first connection must take `expected_peer`'s
        path) and the listener watch in the gateway namespace; both stopped on exit."""
        probe = {"mode": "probe", "server": SERVER, "port": PORT, "proxied": GW_WAN, "direct": CLIENT}
        probe |= {"interval": self.interval_ms / 1000, "timeout": 30}
        watch = {"mode": "watch", "port": TPROXY_PORT, "interval": 0.002, "timeout": 30}
        started: list[Worker] = []
        try:
            started.append(Worker(self.gw, watch))
            started.append(Worker(self.cli, probe))
            started[0].ready("listening" if listening else "not-listening")
            started[1].ready(expected_peer)
            yield started[1], started[0]
        finally:
            for worker in started:
                worker.stop()


def network(cli: str, gw: str, srv: str) -> e2e.Network:
    return e2e.Network(
        namespaces=(cli, gw, srv),
        veths=(
            (cli, "tpc-c0", f"{CLIENT}/24", gw, LAN, f"{GW_LAN}/24"),
            (gw, WAN, f"{GW_WAN}/24", srv, "tpc-s0", f"{SRV_WAN}/24"),
        ),
        routes=((cli, "default", GW_LAN), (gw, "203.0.113.0/24", SRV_WAN), (srv, "default", GW_WAN)),
        forwarding=(gw,),
        addresses=((srv, "lo", f"{SERVER}/32"),),
    )


def start_tproxyd(lab: Lab, policy: str) -> subprocess.Popen[bytes]:
    user_config = lab.workdir / "core-user.json"
    user_config.write_text(
        json.dumps(
            {
                "log": {
                    "loglevel": "warning",
                    "access": str(lab.workdir / "core-access.log"),
                    "error": str(lab.workdir / "core-error.log"),
                },
                "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
            }
        )
    )
    config = write_config(
        lab.workdir / "tproxyd.toml",
        runtime_dir=lab.manager.runtime_dir / "tproxyd",  # %t/tproxyd in the unit
        tproxy={"failure_policy": policy},
        core={"config": user_config, "systemd_bus": lab.manager.bus_address},
    )
    log_path = lab.workdir / "tproxyd.log"
    proc = e2e.spawn(
        lab.gw, [str(e2e.TPROXYD), "--config", str(config)], log_path, env={"DBUS_SYSTEM_BUS_ADDRESS": lab.bus.address}
    )
    lab.tproxyd = proc
    e2e.wait_until(lambda: "tproxyd ready" in log_path.read_text() or proc.poll() is not None, 30, "tproxyd ready")
    if proc.poll() is not None:
        raise RuntimeError(f"tproxyd exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    return proc


def _exec_start_pre(unit: dict[str, Any]) -> tuple[float | None, float | None]:
    """(start, exit) of the last ExecStartPre run, on perf_counter's clock."""
    pre = unit.get("ExecStartPre") or []
    if not pre:
        return None, None
    # (path, argv, ignore_errors, start, start_monotonic, exit, exit_monotonic, pid, code, status)
    return mono(pre[0][4]), mono(pre[0][6])


def _dedupe(values: list[Any]) -> list[Any]:
    """Consecutive repeats dropped (systemd sends a unit's changes on two interfaces)."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def _since(t0: float, t: float | None) -> float | None:
    return None if t is None else (t - t0) * 1000


def _recovery(
    obs: Observer, t0: float, unit: dict[str, Any], result: dict[str, Any], listening: dict[str, Any]
) -> dict[str, Any]:
    """The phases a start and a restart share, in ms from t0: the unit's ExecStartPre and main
    start (from its properties after the sample), the core's listening sockets, tproxyd's
    State=active and the first proxied connection."""
    pre_start, pre_exit = _exec_start_pre(unit)
    return {
        "total": _since(t0, result["proxied"]),
        "pre_start": _since(t0, pre_start),
        "pre_exit": _since(t0, pre_exit),
        "main": _since(t0, mono(unit["ExecMainStartTimestampMonotonic"])),
        "active_enter": _since(t0, mono(unit["ActiveEnterTimestampMonotonic"])),
        "listening": _since(t0, listening["listening"]),
        "not_listening": _since(t0, listening["not_listening"]),
        "state_active": _since(t0, obs.first("tproxyd", "State", ("active",), t0)),
        "opened": _since(t0, result["opened"]),
        "states": obs.sequence("tproxyd", "State", t0, result["proxied"]),
        "attempts": result["after_t0"],
    }


def measure_start(lab: Lab, n: int) -> dict[str, Any]:
    """One sample: core stopped and nothing to proxy -> EnableLink -> first proxied connection."""
    assert lab.observer is not None
    obs = lab.observer
    lab.wait("the core stopped and State off", lambda: lab.unit_state() == "inactive" and lab.state() == "off")
    with lab.workers(CLIENT, listening=False) as (prober, watch):  # nothing diverted yet: direct
        t0 = time.perf_counter()
        obs.call("EnableLink", "ss", [LAN, "lan"])
        replied = time.perf_counter()
        result = prober.result(t0, "proxied")
        listening = watch.result(t0, "listening")
    lab.wait("State active", lambda: lab.state() == "active")
    unit = obs.unit()
    sample = {**_recovery(obs, t0, unit, result, listening), "reply": _since(t0, replied)}
    log(f"core_start: start {n}: {sample['total']:.0f} ms to proxied")
    # Stop the core, then re-arm: nothing to proxy, master switch on, core still stopped.
    t_stop = time.perf_counter()
    obs.call("SetEnabled", "b", [False])
    lab.wait("the core stopped after SetEnabled(false)", lambda: lab.unit_state() == "inactive")
    sample["stop"] = _since(t_stop, obs.first("unit", "ActiveState", ("inactive",), t_stop))
    lab.wait("State off", lambda: lab.state() == "off")
    obs.call("DisableLink", "s", [LAN])
    obs.call("SetEnabled", "b", [True])
    time.sleep(0.2)
    if lab.unit_state() != "inactive" or lab.state() != "off":
        lab.notes.append(f"after DisableLink + SetEnabled(true) (nothing to proxy) the unit is {lab.unit_state()}")
    return sample


def measure_kill(lab: Lab, n: int) -> dict[str, Any]:
    """One sample: traffic proxied -> SIGKILL of the core's MainPID -> first proxied connection again."""
    assert lab.observer is not None
    obs = lab.observer
    before = obs.unit()
    pid, restarts = int(before["MainPID"]), int(before["NRestarts"])
    comm = Path(f"/proc/{pid}/comm").read_text().strip() if pid else ""
    if comm != "v2ray":
        raise RuntimeError(f"the unit's MainPID {pid} is not the core ({comm!r})")
    with lab.workers(GW_WAN, listening=True) as (prober, watch):  # proxied before the kill
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)  # the unit runs in our PID namespace: the core our manager started
        result = prober.result(t0, "proxied")
        listening = watch.result(t0, "listening")
    lab.wait("State active", lambda: lab.state() == "active")

    def restarted() -> dict[str, Any] | None:
        unit = obs.unit()
        return unit if unit["ActiveState"] == "active" and int(unit["MainPID"]) not in (0, pid) else None

    after = lab.wait("the unit active with a new MainPID", restarted)
    if int(after["NRestarts"]) != restarts + 1:
        lab.notes.append(f"kill {n}: NRestarts went {restarts} -> {after['NRestarts']} (expected +1)")
    outage = obs.first("tproxyd", "State", ("degraded", "blocked"), t0)
    sample = {
        **_recovery(obs, t0, after, result, listening),
        "failed": _since(t0, obs.first("unit", "ActiveState", ("failed",), t0)),
        # systemd 252: failed -> auto-restart -> (RestartSec timer) -> dead -> start-pre
        "dead": _since(t0, mono(after["InactiveEnterTimestampMonotonic"])),
        "outage_state": _since(t0, outage),
        "first_direct": _since(t0, result["first_direct"]),
        "core_states": obs.sequence("tproxyd", "CoreState", t0, result["proxied"]),
        "sub_states": _dedupe(obs.sequence("unit", "SubState", t0, result["proxied"])),
    }
    log(f"core_start: kill {n}: {sample['total']:.0f} ms to proxied again")
    # A random pause: the next kill falls at a random phase of systemd's coalesced timer wake-ups,
    # so the samples cover the whole RestartSec + 0-250 ms range instead of clustering.
    time.sleep(SETTLE + random.uniform(0, TIMER_ACCURACY))
    return sample


def measure_idle(lab: Lab, seconds: float) -> dict[str, Any]:
    """tproxyd's wake-ups (context switches, all threads) over `seconds` with the supervised core
    up and proxying and nothing changing; {} when `seconds` is 0."""
    if seconds <= 0:
        return {}
    assert lab.tproxyd is not None
    lab.wait("State active before the idle window", lambda: lab.state() == "active")
    time.sleep(IDLE_SETTLE)
    log(f"core_start: idle for {seconds:g} s")
    return {"idle_s": seconds, "idle_switches": idle_wakeups(lab.tproxyd.pid, seconds)}


def core_listeners(ns: str) -> tuple[int, int]:
    """TCP listeners on the tproxy port, IPv4 and IPv6 (v2ray sets SO_REUSEPORT: a second
    instance would bind the same port without an error)."""
    counts = []
    for family in ("-4", "-6"):
        out = e2e.in_ns(ns, "ss", "-Htln", family, f"sport = :{TPROXY_PORT}").stdout
        counts.append(len(out.splitlines()))
    return counts[0], counts[1]


def run(args: argparse.Namespace) -> Report:
    require_root()
    pid = os.getpid()
    cli, gw, srv = (f"{NS_PREFIX}{role}-{pid}" for role in ("cli", "gw", "srv"))
    workdir = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}core-start-"))
    workdir.chmod(0o755)
    bus = PrivateBus(workdir)
    manager = UserManager(workdir / "um", f"{NS_PREFIX}core-start-{pid}")
    lab = Lab(workdir, cli, gw, srv, bus, manager, args.interval)
    server: subprocess.Popen[bytes] | None = None
    tproxyd_rc: int | None = None
    try:
        log(f"core_start: namespaces {cli}, {gw}, {srv}; work directory {workdir}")
        network(cli, gw, srv).build()
        server = e2e.start_peer_server(srv, workdir / "server.log", (PORT,), ())
        bus.start()
        manager.start()
        # The shipped unit; the drop-in only joins the gateway namespace and shows the core the work
        # directory (its config and logs), which lies under the /tmp that PrivateTmp= hides.
        manager.install_unit(SHIPPED_UNIT, f"[Service]\nNetworkNamespacePath=/run/netns/{gw}\nBindPaths={workdir}\n")
        restart_shown = manager.systemctl("show", "-p", "RestartUSec", "--value", UNIT).strip()
        lab.observer = Observer(bus.address, manager.bus_address)
        lab.observer.start()
        start_tproxyd(lab, args.policy)
        restart_usec = int(lab.observer.unit()["RestartUSec"])

        manager.systemctl("reset-failed", UNIT, check=False)
        starts = [measure_start(lab, n + 1) for n in range(args.starts)]

        manager.systemctl("reset-failed", UNIT, check=False)
        lab.observer.call("EnableLink", "ss", [LAN, "lan"])
        lab.wait("State active before the kills", lambda: lab.state() == "active")
        kills = [measure_kill(lab, n + 1) for n in range(args.kills)]
        idle = measure_idle(lab, args.idle)
        listeners = core_listeners(gw)
        if listeners != (1, 1):
            lab.notes.append(f"listeners on the tproxy port (IPv4, IPv6) at the end: {listeners}, expected (1, 1)")
        core_log = workdir / "core-error.log"
        core_starts = (
            len(re.findall(r"V2Ray \S+ started", core_log.read_text(errors="replace"))) if core_log.exists() else -1
        )
        expected = args.starts + 1 + args.kills
        if core_starts != expected:
            lab.notes.append(f"the core logged {core_starts} starts; {expected} expected")
    finally:
        if lab.observer is not None:
            lab.observer.stop()
        if lab.tproxyd is not None:
            tproxyd_rc = e2e.stop_process(lab.tproxyd, timeout=20)
        manager.stop()
        bus.stop()
        if server is not None:
            e2e.stop_process(server)
        for ns in (cli, gw, srv):
            e2e.delete_namespace(ns)
        if args.keep:
            log(f"core_start: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if tproxyd_rc != 0:
        lab.notes.append(f"tproxyd exited with {tproxyd_rc} on SIGTERM")
    data = {
        "policy": args.policy,
        "interval_ms": args.interval,
        "restart_usec": restart_usec,
        "restart_shown": restart_shown,
        "starts": _named(starts),
        "kills": _named(kills),
        "notes": lab.notes,
        **idle,
    }
    return save_results("core_start", data)


def _named(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples with their connection attempts keyed by what answered (direct/proxied) or the error."""
    names = {CLIENT: "direct", GW_WAN: "proxied"}
    return [
        {**s, "attempts": {names.get(k, k.removeprefix("error:")): n for k, n in s["attempts"].items()}}
        for s in samples
    ]


def _worker(params: dict[str, Any]) -> dict[str, Any]:
    """`--worker PARAMS`: the prober (client namespace) or the listen watch (gateway namespace)."""
    return asyncio.run(_probe(params)) if params["mode"] == "probe" else _watch(params)


def main(argv: Sequence[str]) -> int:
    return bench_main(argv, parse_args, run, _worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
