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
  * calls/s with 10 concurrent clients, each toggling its own present link.
Every measurement is repeated (--runs); the raw samples go to bench/results/dbus_calls.json and
bench/render.py makes the table (all runs pooled, and each run's median).

Run as root: .venv/bin/python bench/dbus_calls.py [--pairs 300] [--getall 1000] [--runs 3]
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

from benchlib import Report, bypass_lines, log, print_report, require_root, save_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration import harness as h  # noqa: E402  (the repository root is on sys.path now)

PARALLEL_CLIENTS = 10
BYPASS_V4, BYPASS_V6 = 100_000, 2_000


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=300, help="EnableLink+DisableLink pairs per run (default 300)")
    parser.add_argument("--getall", type=int, default=1000, help="GetAll calls per run (default 1000)")
    parser.add_argument("--parallel-pairs", type=int, default=50, help="pairs per client, 10 clients (default 50)")
    parser.add_argument(
        "--hung-pairs", type=int, default=25, help="pairs per run as root with polkitd stopped (default 25)"
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every measurement (default 3)")
    return parser.parse_args(argv)


# --- the worker: a client process ------------------------------------------------------------------


async def _worker(params: dict[str, Any]) -> dict[str, Any]:
    from dbus_fast import Message, MessageType

    from tproxy_service.bus import names
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
        bypass.write_text("\n".join(bypass_lines(BYPASS_V4, BYPASS_V6)) + "\n")
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
                runs.append(result)
            rss = daemon.rss_kb()
    data = {"runs": runs, "clients": PARALLEL_CLIENTS, "parallel_pairs": args.parallel_pairs, "rss_kb": rss}
    return save_results("dbus_calls", data)


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "--worker":
        print(json.dumps(asyncio.run(_worker(json.loads(argv[1])))), flush=True)
        return 0
    print_report(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
