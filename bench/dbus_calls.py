"""D-Bus call latency and throughput of tproxyd, polkit included, with 100k bypass entries loaded.

The real stack of the integration tests (tests/integration/harness.py): a private system bus with
the shipped bus policy, the real polkitd with the shipped actions, and tproxyd in a `tpd-*` network
namespace with a `[bypass] files` list of 100,000 IPv4 /24s + 2,000 IPv6 /48s. Clients are
separate processes (`--worker`), as root and as a user granted by a polkit JS rule (the path a
desktop user with a rules file takes). Measured:
  * EnableLink + DisableLink of a present link: every call is one sample (a polkit check, a
    reconcile pass with a netlink set-element update, an fsync'ed save); goal p50 <= 10 ms,
    p99 <= 30 ms;
  * Properties.GetAll: goal p50 <= 2 ms;
  * EnableLink + DisableLink as root while polkitd is stopped (SIGSTOP): root is allowed without
    asking polkit, so a hung polkitd must not slow it down;
  * calls/s with 10 concurrent clients, each toggling its own present link;
  * GetAll during a Reload of a changed list: the list file is rewritten (`update`: 1% of its
    lines replaced by other random /24s; `new`: a whole new random list of the same size), then
    root calls Reload, whose reply comes once the new list is in the kernel. A client (nobody)
    starts a GetAll every --getall-interval ms (or right after the previous reply, when that
    came later) from before the Reload until after its reply; the calls that overlap the Reload
    show how long a D-Bus call waits behind it (goal: p99 <= 20 ms). Before every `update` a
    Reload (not measured) puts the original list back;
  * idle: tproxyd's context switches (all threads) over --idle seconds with nothing happening
    (once, after the runs): the wake-ups of a daemon on a real bus (goal: 0).
Every measurement is repeated (--runs); the raw samples go to bench/results/dbus_calls.json and
bench/render.py makes the table (all runs pooled, and each run's median).

Run as root: .venv/bin/python bench/dbus_calls.py [--pairs 300] [--getall 1000] [--runs 3] [--idle 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    SEED,
    Report,
    bench_parser,
    bypass_lines,
    idle_wakeups,
    log,
    print_report,
    replace_v4_lines,
    require_root,
    save_results,
)
from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration import harness as h  # noqa: E402  (the repository root is on sys.path now)
from tproxy_service.bus import names  # noqa: E402
from tproxy_service.bus.call import method_call  # noqa: E402

PARALLEL_CLIENTS = 10
BYPASS_V4, BYPASS_V6 = 100_000, 2_000
IDLE_SETTLE = 2.0  # s after the last call before the idle window: deferred work (frees, trims) is done


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return bench_parser(
        __doc__,
        ("--pairs", 300, "EnableLink+DisableLink pairs per run"),
        ("--getall", 1000, "GetAll calls per run"),
        ("--parallel-pairs", 50, "pairs per client, 10 clients"),
        ("--hung-pairs", 25, "pairs per run as root with polkitd stopped"),
        ("--getall-interval", 2.0, "ms between GetAll starts during a Reload"),
        ("--idle", 60.0, "idle window in seconds, 0 to skip"),
        ("--runs", 3, "repetitions of every measurement"),
    ).parse_args(argv)


# --- the worker: a client process ------------------------------------------------------------------


async def _worker(params: dict[str, Any]) -> dict[str, Any]:
    from dbus_fast import Message

    from tproxy_service.bus.connection import connect_system_bus

    def manager(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
        return Message(
            destination=names.BUS_NAME,
            path=names.OBJECT_PATH,
            interface=names.MANAGER_IFACE,
            member=member,
            signature=signature,
            body=body or [],
        )

    getall = Message(
        destination=names.BUS_NAME,
        path=names.OBJECT_PATH,
        interface=names.PROPERTIES_IFACE,
        member="GetAll",
        signature="s",
        body=[names.MANAGER_IFACE],
    )

    async def timed(bus: Any, msg: Message) -> float:
        start = time.perf_counter()
        reply = await bus.call(msg)
        elapsed = (time.perf_counter() - start) * 1000
        if reply.message_type is MessageType.ERROR:
            raise RuntimeError(f"{msg.member}: {reply.error_name}: {reply.body}")
        return elapsed

    async def toggles(bus: Any, link: str, pairs: int) -> list[float]:
        samples = []
        for _ in range(pairs):
            samples.append(await timed(bus, manager("EnableLink", "ss", [link, "lan"])))
            samples.append(await timed(bus, manager("DisableLink", "s", [link])))
        return samples

    async def paced_getall(bus: Any, interval: float) -> list[list[float]]:
        """GetAll every `interval` s (or right after a late reply) until a line on stdin;
        returns [start, end] pairs on perf_counter's clock (CLOCK_MONOTONIC: the parent's too)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(sys.stdin.fileno(), stop.set)
        print("ready", flush=True)
        samples, next_at = [], time.perf_counter()
        while not stop.is_set():
            start = time.perf_counter()
            await timed(bus, getall)
            samples.append([start, time.perf_counter()])
            next_at = max(next_at + interval, time.perf_counter())
            await asyncio.sleep(next_at - time.perf_counter())
        loop.remove_reader(sys.stdin.fileno())
        return samples

    mode = params["mode"]
    if mode == "parallel":
        buses = [await connect_system_bus() for _ in params["links"]]
        start = time.perf_counter()
        await asyncio.gather(
            *(toggles(b, link, params["pairs"]) for b, link in zip(buses, params["links"], strict=True))
        )
        seconds = time.perf_counter() - start
        for b in buses:
            b.disconnect()
        return {"calls": 2 * params["pairs"] * len(buses), "seconds": seconds}
    bus = await connect_system_bus()
    try:
        if mode == "toggle":
            await toggles(bus, params["link"], 5)  # warm-up
            return {"samples": await toggles(bus, params["link"], params["pairs"])}
        for _ in range(20):  # warm-up
            await timed(bus, getall)
        if mode == "paced-getall":
            return {"samples": await paced_getall(bus, params["interval"])}
        return {"samples": [await timed(bus, getall) for _ in range(params["count"])]}
    finally:
        bus.disconnect()


def run_client(user: h.User, bus: h.PrivateBus, params: dict[str, Any]) -> dict[str, Any]:
    argv = [str(h.PYTHON), str(Path(__file__).resolve()), "--worker", json.dumps(params)]
    proc = h.as_user(user, argv, bus.env(), timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"client as {user.name} failed: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- the parent: stack, daemon, measurements ------------------------------------------------------

LEAD_IN, TAIL = 0.2, 0.1  # s of GetAll calls before the Reload and after its reply (the calm around it)
UPDATE_FRACTION = 0.01  # the realistic update: this share of the list's lines replaced


class GetAllClient:
    """The `paced-getall` worker as nobody: GetAll calls until told to stop."""

    def __init__(self, bus: h.PrivateBus, interval_ms: float) -> None:
        params = {"mode": "paced-getall", "interval": interval_ms / 1000}
        argv = [str(h.PYTHON), str(Path(__file__).resolve()), "--worker", json.dumps(params)]
        self.proc = h.user_popen(h.PLAIN, argv, bus.env(), stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the GetAll client did not start: {self._stop_and_stderr()}")

    def samples(self) -> list[list[float]]:
        assert self.proc.stdin is not None
        out, err = self.proc.communicate("stop\n", timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the GetAll client failed: {err.strip()}")
        samples: list[list[float]] = json.loads(out.strip().splitlines()[-1])["samples"]
        return samples

    def _stop_and_stderr(self) -> str:
        h.stop_pid(self.proc)
        return self.proc.stderr.read() if self.proc.stderr else ""


async def _reload_call(address: str) -> tuple[float, float]:
    """Root's D-Bus Reload on a connection made beforehand; (t0, reply) on perf_counter's clock."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        msg = method_call(names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, "Reload", "", [])
        await asyncio.sleep(LEAD_IN)
        t0 = time.perf_counter()
        reply = await asyncio.wait_for(bus.call(msg), 300)
        t1 = time.perf_counter()
    finally:
        bus.disconnect()
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"Reload failed: {reply.error_name}: {reply.body}")
    return t0, t1


def reload_under_getall(
    stack: h.Stack, daemon: h.Tproxyd, bypass: Path, lines: Sequence[str], probe: str, interval_ms: float
) -> dict[str, Any]:
    """Write `lines` to the list file, Reload while a client calls GetAll, check that `probe` (a new
    entry) is in the kernel. Times in ms from the Reload call (t0); GetAll as [start, duration]."""
    bypass.write_text("\n".join(lines) + "\n")
    client = GetAllClient(stack.bus, interval_ms)
    try:
        t0, t1 = asyncio.run(_reload_call(stack.bus.address))
    except BaseException:
        h.stop_pid(client.proc)
        raise
    time.sleep(TAIL)
    samples = client.samples()
    if not in_bypass4(daemon, probe):
        raise RuntimeError(f"{probe} is not in bypass4 after the Reload's reply")
    return {
        "reload_ms": (t1 - t0) * 1000,
        "getall": [[(start - t0) * 1000, (end - start) * 1000] for start, end in samples],
    }


def in_bypass4(daemon: h.Tproxyd, cidr: str) -> bool:
    address = cidr.split("/")[0]
    proc = daemon.netns.exec("nft", "get", "element", "inet", "tproxyd", "bypass4", f"{{ {address} }}", check=False)
    return proc.returncode == 0


def measure_reloads(
    stack: h.Stack, daemon: h.Tproxyd, bypass: Path, original: Sequence[str], run_no: int, interval_ms: float
) -> dict[str, Any]:
    """One `update` and one `new` Reload (see the module's doc); the original list is put back
    first (when another one is loaded), so every `update` changes 1% of what is loaded."""
    if run_no:
        bypass.write_text("\n".join(original) + "\n")
        asyncio.run(_reload_call(stack.bus.address))
    count = round(UPDATE_FRACTION * sum(1 for line in original if line and not line.startswith("#")))
    updated, added = replace_v4_lines(original, count, SEED + 1000 + run_no)
    result: dict[str, Any] = {"update": reload_under_getall(stack, daemon, bypass, updated, added[0], interval_ms)}
    fresh = bypass_lines(BYPASS_V4, BYPASS_V6, seed=SEED + 2000 + run_no)
    probe = next(line for line in fresh if _is_new_v4(line, updated))  # not loaded before
    result["new"] = reload_under_getall(stack, daemon, bypass, fresh, probe, interval_ms)
    result["update_lines"] = count
    return result


def _is_new_v4(line: str, loaded: Sequence[str]) -> bool:
    return line.endswith("/24") and line not in loaded


@contextlib.contextmanager
def stopped(proc: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """polkitd hung (SIGSTOP) for the block, resumed whatever happens."""
    if proc is None:
        raise RuntimeError("polkitd is not running")
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def run(args: argparse.Namespace) -> Report:
    require_root()
    with h.stack() as stack:
        bypass = stack.workdir / "bypass.list"
        original = bypass_lines(BYPASS_V4, BYPASS_V6)
        bypass.write_text("\n".join(original) + "\n")
        bypass.chmod(0o644)
        with h.daemon_in_netns(stack.bus, {h.LINK_A: "host"}, extra=f'[bypass]\nfiles = ["{bypass}"]') as daemon:
            links = [f"tpdb{i}" for i in range(PARALLEL_CLIENTS)]
            for link in links:
                daemon.netns.exec("ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}p")
                daemon.netns.exec("ip", "link", "set", link, "up")
            log("dbus_calls: starting tproxyd with 100k bypass entries")
            started = time.perf_counter()
            daemon.start(wait=False)
            daemon.wait_ready(timeout=300)
            log(f"dbus_calls: tproxyd ready after {time.perf_counter() - started:.1f} s")
            elements = daemon.netns.exec("nft", "list", "set", "inet", "tproxyd", "bypass4").stdout.count("/24")
            if elements < BYPASS_V4:
                raise RuntimeError(f"only {elements} /24s in bypass4; the list was not loaded")
            runs: list[dict[str, Any]] = []
            for run_no in range(args.runs):
                log(f"dbus_calls: run {run_no + 1}/{args.runs}")
                toggle = {"mode": "toggle", "link": h.LINK_B, "pairs": args.pairs}
                result: dict[str, Any] = {
                    f"toggle-{user.name}": run_client(user, stack.bus, toggle)["samples"]
                    for user in (h.ROOT, h.GRANTED)
                }
                result["getall"] = run_client(h.PLAIN, stack.bus, {"mode": "getall", "count": args.getall})["samples"]
                with stopped(stack.polkit.proc):
                    hung = {**toggle, "pairs": args.hung_pairs}
                    result["hung-root"] = run_client(h.ROOT, stack.bus, hung)["samples"]
                parallel = {"mode": "parallel", "links": links, "pairs": args.parallel_pairs}
                throughput = run_client(h.ROOT, stack.bus, parallel)
                result["parallel_calls"], result["parallel_s"] = throughput["calls"], throughput["seconds"]
                result["reloads"] = measure_reloads(stack, daemon, bypass, original, run_no, args.getall_interval)
                runs.append(result)
            rss = daemon.rss_kb()
            idle: dict[str, Any] = {}
            if args.idle > 0:
                assert daemon.proc is not None
                log(f"dbus_calls: idle for {args.idle:g} s")
                time.sleep(IDLE_SETTLE)
                idle = {"idle_s": args.idle, "idle_switches": idle_wakeups(daemon.proc.pid, args.idle)}
    data = {
        "runs": runs,
        "clients": PARALLEL_CLIENTS,
        "parallel_pairs": args.parallel_pairs,
        "rss_kb": rss,
        "getall_interval_ms": args.getall_interval,
        "tail_ms": TAIL * 1000,
        "bypass": [BYPASS_V4, BYPASS_V6],
        **idle,
    }
    return save_results("dbus_calls", data)


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "--worker":
        print(json.dumps(asyncio.run(_worker(json.loads(argv[1])))), flush=True)
        return 0
    print_report(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
