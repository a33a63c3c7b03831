"""NetworkManager reaction: a connection matching a [[networkmanager.auto]] policy comes up -> its
link is in set `host_links` (and back out when it goes down).

The world of tests/nm (a real NetworkManager confined in a namespace sandbox on its own bus, tproxyd
next to it, v2ray), with 100k IPv4 + 2k IPv6 bypass CIDRs loaded. A worker in the gateway namespace
listens to the sandbox's bus (the café link's Device.StateChanged) and to the nf_tables multicast
group, and `--cycles` times runs `nmcli connection up` / `down`. Per cycle, on the one clock
(perf_counter, CLOCK_MONOTONIC):
  * ACTIVATED -> rules: from the device's StateChanged(100) signal arriving to the NEWSETELEM event
    for `host_links` (the issue's metric; negative when the rules were there first, and the goals
    count max(0, value)). tproxyd acts as soon as the connection starts activating: with a real
    Wi-Fi or DHCP activation (hundreds of ms to seconds) the rules are in place long before
    ACTIVATED; these test connections (a static address on a veth) activate in ~5 ms, so here the
    rules follow ACTIVATED by a few ms;
  * first signal -> rules: from StateChanged(prepare), NetworkManager's first word on the link, to
    the same event: tproxyd's own reaction time;
  * DEACTIVATING -> released: from StateChanged(110) to the DELSETELEM event. This one waits for
    NetworkManager to answer tproxyd's re-read, which it does only once its deactivation work is
    done (~30 ms here, seen on the bus).
Anchors (their reaction models, not measured here): sing-box debounces network changes 1 s;
v2rayA polls every 3 s (median 1.5 s).
Then the shipped dispatcher script (nm-dispatcher/90-tproxyd) is run `--dispatcher` times with
tproxyd running, stopped, and hung (a process owns its name and never answers), and
`--activations` times with tproxyd installed but not running (the call D-Bus-activates it):
the time until it returns (NetworkManager waits for it).

Raw samples: bench/results/nm_reaction.json; bench/render.py makes the tables.
Run as root: .venv/bin/python bench/nm_reaction.py [--cycles 50] [--bypass 100000] [--dispatcher 20] [--activations 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    Report,
    bench_main,
    bench_parser,
    bypass_lines,
    log,
    run_worker,
    save_results,
)

from tproxy_service.bus import names
from tproxy_service.kernel.netlink_wire import messages, parse_attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the world of tests/nm is the benchmark's setup

NETLINK_NETFILTER, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES = 12, 270, 1, 7
NFT_NEWSETELEM, NFT_DELSETELEM = (10 << 8) | 12, (10 << 8) | 14
NFTA_SET_ELEM_LIST_SET = 2
SET_NAME = b"host_links\0"
PREPARE, ACTIVATED, DEACTIVATING = 40, 100, 110


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return bench_parser(
        __doc__,
        ("--cycles", 50, "up/down cycles"),
        ("--dispatcher", 20, "dispatcher script runs per tproxyd state"),
        ("--activations", 5, "dispatcher script runs that D-Bus-activate tproxyd"),
        ("--bypass", 100_000, "IPv4 /24s in the bypass file"),
    ).parse_args(argv)


# --- worker (in the gateway namespace) -------------------------------------------------------------


def set_events(buf: bytes) -> list[int]:
    """The NEWSETELEM/DELSETELEM message types for set host_links in one netlink read."""
    return [
        msg.kind
        for msg in messages(buf)
        if msg.kind in (NFT_NEWSETELEM, NFT_DELSETELEM)
        and parse_attrs(buf, msg.start + 4, msg.end).get(NFTA_SET_ELEM_LIST_SET) == SET_NAME
    ]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.changed = asyncio.Event()

    def add(self, what: str) -> None:
        self.events.append((what, time.perf_counter()))
        self.changed.set()

    async def wait(self, what: str, since: int, timeout: float = 10.0) -> float | None:
        deadline = time.perf_counter() + timeout
        while True:
            for name, when in self.events[since:]:
                if name == what:
                    return when
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return None


async def worker_async(params: dict[str, Any]) -> dict[str, Any]:
    from dbus_fast import Message
    from dbus_fast.aio import MessageBus

    from tproxy_service.bus.call import add_match, call_method, method_call

    rec = Recorder()
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)

    def readable() -> None:
        while select.select([sock], [], [], 0)[0]:
            for kind in set_events(sock.recv(1 << 20)):
                rec.add("new" if kind == NFT_NEWSETELEM else "del")

    asyncio.get_running_loop().add_reader(sock.fileno(), readable)
    bus = await MessageBus(bus_address=params["bus"]).connect()
    (device,) = await call_method(
        bus, method_call(names.NM_NAME, names.NM_PATH, names.NM_IFACE, "GetDeviceByIpIface", "s", [params["link"]])
    )

    def on_signal(msg: Message) -> None:
        if msg.path == device and msg.interface == names.NM_DEVICE_IFACE and msg.member == "StateChanged":
            rec.add(f"state{msg.body[0]}")

    bus.add_message_handler(on_signal)
    rule = f"type='signal',sender='{names.NM_NAME}',interface='{names.NM_DEVICE_IFACE}',path='{device}'"
    await add_match(bus, rule)
    nmcli = [
        "nsenter",
        f"--target={params['init_pid']}",
        "--mount",
        "--uts",
        "--pid",
        "--net",
        "--",
        "nmcli",
        "--wait",
        "20",
        "connection",
    ]
    samples: dict[str, list[float]] = {"activated": [], "first": [], "released": []}
    missed = 0
    for _cycle in range(int(params["cycles"])):
        for step in ("up", "down"):
            since = len(rec.events)
            proc = await asyncio.create_subprocess_exec(*nmcli, step, params["connection"])
            if await proc.wait() != 0:
                raise RuntimeError(f"nmcli connection {step} failed")
            if step == "up":
                first, activated, rules = [
                    await rec.wait(w, since) for w in (f"state{PREPARE}", f"state{ACTIVATED}", "new")
                ]
                if None in (first, activated, rules):
                    missed += 1
                    continue
                assert first is not None and activated is not None and rules is not None
                samples["activated"].append((rules - activated) * 1000)
                samples["first"].append((rules - first) * 1000)
            else:
                deactivating, released = [await rec.wait(w, since) for w in (f"state{DEACTIVATING}", "del")]
                if deactivating is None or released is None:
                    missed += 1
                    continue
                samples["released"].append((released - deactivating) * 1000)
            await asyncio.sleep(0.05)  # let everything settle; not timed
    bus.disconnect()
    return {"samples": samples, "missed": missed}


def dispatcher_returns(world: Any, runs: int, activations: int) -> dict[str, list[float]]:
    """How long the shipped NetworkManager dispatcher script takes to return (ms), with tproxyd
        running, stopped, hung (its name owned, calls never answered), and installed for D-Bus activation
    but not running. It must
        never delay NetworkManager: its call runs in the background."""
    from tests.nm import harness as h

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": world.bus.address}
    sessions: list[int] = []

    def script_ms() -> float:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(h.DISPATCHER_SCRIPT), h.CAFE_LINK, "up"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if proc.wait(timeout=10) != 0:
            raise RuntimeError(f"the dispatcher script exited with {proc.returncode}")
        sessions.append(proc.pid)
        return (time.perf_counter() - start) * 1000

    def settled() -> None:  # every background call answered or timed out (2 s)
        h.wait_until(lambda: not any(h.session_alive(s) for s in sessions), 15, "the script's background calls")

    samples = {"running": [script_ms() for _ in range(runs)]}
    settled()
    world.tproxyd.stop()
    samples["stopped"] = [script_ms() for _ in range(runs)]
    settled()
    with busy_daemon(world.bus.address):
        samples["hung (the name owned, calls never answered)"] = [script_ms() for _ in range(runs)]
        settled()
    samples["installed, not running (the call activates it)"] = [
        activated_ms(world, script_ms) for _ in range(activations)
    ]
    settled()
    return samples


BUSY_DAEMON = """
import asyncio, sys
from dbus_fast import NameFlag
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    bus.add_message_handler(lambda msg: True if msg.path == sys.argv[3] else None)  # taken, never answered
    await bus.request_name(sys.argv[2], NameFlag.DO_NOT_QUEUE)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@contextlib.contextmanager
def busy_daemon(bus_address: str) -> Iterator[None]:
    """A hung tproxyd: a process owning tproxyd's bus name that takes every call and never answers."""
    argv = [sys.executable, "-c", BUSY_DAEMON, bus_address, names.BUS_NAME, names.OBJECT_PATH]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the busy daemon did not take tproxyd's name")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def activated_ms(world: Any, script_ms: Callable[[], float]) -> float:
    """One script run with tproxyd installed for D-Bus activation but not running; the tproxyd the
    call activates is stopped (by its PID) before the next run."""
    from tests.nm import harness as h

    service = world.sandbox.services_dir / f"{names.BUS_NAME}.service"
    service.write_text(
        f"[D-BUS Service]\nName={names.BUS_NAME}\nExec={h.TPROXYD} --config {world.tproxyd.config}\nUser=root\n"
    )
    elapsed = script_ms()
    h.wait_until(lambda: world.bus.has_owner(names.BUS_NAME), 60, "tproxyd D-Bus-activated by the script's call")
    pids = [pid for pid, cmd in world.sandbox.processes() if f"--config {world.tproxyd.config}" in cmd]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    h.wait_until(lambda: all(h.gone(pid) for pid in pids), 30, "the activated tproxyd to exit")
    h.wait_until(lambda: not world.bus.has_owner(names.BUS_NAME), 10, "the activated tproxyd's name to go")
    return elapsed


# --- parent ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    from tests.nm import harness as h

    world = h.World()
    try:
        world.build()
        world.nm.start()
        world.add_connections()
        bypass = world.workdir / "bypass.txt"
        bypass.write_text("\n".join(bypass_lines(args.bypass, 2000)) + "\n")
        world.tproxyd.write_config(bypass={"files": [bypass]})
        log(f"nm_reaction: starting tproxyd with {args.bypass} + 2000 bypass CIDRs")
        start = time.perf_counter()
        world.tproxyd.start()
        ready = time.perf_counter() - start
        log(f"nm_reaction: tproxyd ready after {ready:.2f} s; {args.cycles} cycles")
        params = {
            "bus": world.bus.address,
            "init_pid": world.sandbox.init_pid,
            "link": h.CAFE_LINK,
            "connection": h.CAFE,
            "cycles": args.cycles,
        }
        result = run_worker(world.gw, __file__, params)
        result["dispatcher"] = dispatcher_returns(world, args.dispatcher, args.activations)
    finally:
        problems = world.close()
        if problems:
            log("nm_reaction: cleanup problems: " + "; ".join(problems))
    return save_results("nm_reaction", {**result, "bypass": args.bypass, "cycles": args.cycles, "ready_s": ready})


def main(argv: Sequence[str]) -> int:
    return bench_main(argv, parse_args, run, lambda params: asyncio.run(worker_async(params)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
