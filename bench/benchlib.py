"""Shared helpers for the benchmarks: namespaces, workers, CIDR generation, statistics, tables.

Every benchmark is a parent process (in the main namespace, where it only runs `ip netns add/del`
and `ip netns exec`) plus workers that run inside fresh network namespaces named `tpb-*`. The
parent deletes its namespaces in `finally` blocks, even when a worker fails."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tproxy_service.cidrs import address_set, union
from tproxy_service.desired import RESERVED
from tproxy_service.model import AddressSet, Interval, NftState, TproxySettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
TPROXYD = str(Path(PYTHON).parent / "tproxyd")
NS_PREFIX = "tpb-"
SEED = 20240601
# Kept out of the random bypass lists: the benchmarks use them as "the internet" on purpose.
DOC_NETS = ((192 << 16) | (0 << 8) | 2, (198 << 16) | (51 << 8) | 100, (203 << 16) | (0 << 8) | 113)


# --- processes and namespaces -------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sh(*argv: str, check: bool = True) -> str:
    """Run a command, return its stdout; on failure raise with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_ns(ns: str, *argv: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (network namespaces, nftables)")


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so every `finally` (namespace deletion) runs."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def netns(tag: str) -> Iterator[str]:
    """A fresh network namespace `tpb-TAG-PID` with lo up; deleted on exit, whatever happened."""
    name = f"{NS_PREFIX}{tag}-{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all of `pid`'s threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "status").read_text()
        total += sum(int(n) for n in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", text, re.M))
    return total


def idle_wakeups(pid: int, seconds: float) -> int:
    """Context switches of `pid` (all threads) over `seconds` in which the caller does nothing:
    every one is a wake-up (a timer, a message, a signal)."""
    before = context_switches(pid)
    time.sleep(seconds)
    return context_switches(pid) - before


def run_worker(ns: str, script: str, params: dict[str, Any]) -> Any:
    """Run `script --worker PARAMS` inside `ns` with the venv's python; its last stdout line is JSON."""
    argv = ["ip", "netns", "exec", ns, PYTHON, str(Path(script).resolve()), "--worker", json.dumps(params)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {Path(script).name} in {ns} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_main(argv: Sequence[str]) -> dict[str, Any] | None:
    """The parsed `--worker JSON` parameters, or None when not started as a worker."""
    if len(argv) >= 2 and argv[0] == "--worker":
        return dict(json.loads(argv[1]))
    return None


def emit(result: Any) -> None:
    print(json.dumps(result), flush=True)


class Daemon:
    """tproxyd inside a namespace (`ip netns exec` execs, so the pid we hold is tproxyd's)."""

    def __init__(self, ns: str, config: Path, ready_timeout: float = 120.0) -> None:
        self.ns = ns
        self.config = config
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_lines: list[str] = []
        self.ready_after = 0.0
        self._ready_line = ""
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        return [TPROXYD, "--config", str(self.config)]

    def start(self) -> float:
        """Start and wait for `tproxyd ready`; returns the seconds it took."""
        start = time.perf_counter()
        # A bus address that cannot exist: a benchmark daemon must never own the real bus name.
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.config.parent}/no-such-bus"}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *self.command()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(self.ready_timeout) or not self._ready_line:
            self.stop()
            raise RuntimeError("tproxyd did not get ready:\n" + "\n".join(self.stderr_lines[-20:]))
        self.ready_after = time.perf_counter() - start
        if "state=active" not in self._ready_line:
            self.stop()
            raise RuntimeError(f"tproxyd is not active: {self._ready_line}")
        return self.ready_after

    def _read_stderr(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip())
            if "tproxyd ready" in line:
                self._ready_line = line.strip()
                ready.set()
        ready.set()  # EOF: the daemon exited

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)


def write_config(path: Path, bypass_file: Path, links: dict[str, str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' config renderer
    from tests import tproxyd_config

    # No proxy core in the benchmarks: tproxyd treats the core as external and diverts anyway
    # (diverted traffic then finds no listener, which dataplane.py uses as its control).
    tproxyd_config.write_config(path, bypass={"files": [bypass_file]}, core={"supervise": False}, links=links)


# --- bypass lists -------------------------------------------------------------------------------


def _reserved24(index: int) -> bool:
    address = index << 8
    return index in DOC_NETS or any(iv.first <= address <= iv.last for iv in RESERVED.v4)


def random_v4_cidrs(count: int, seed: int = SEED) -> list[str]:
    """`count` distinct IPv4 /24s, none adjacent to another (every other /24), none reserved:
    the bypass set then holds exactly `count` user elements."""
    rng = random.Random(seed)
    chosen: set[int] = set()
    while len(chosen) < count:
        index = rng.randrange(1 << 15, 224 << 15) * 2  # even /24 index in 1.0.0.0 - 223.255.254.0
        if index not in chosen and not _reserved24(index):
            chosen.add(index)
    return [f"{i >> 16}.{(i >> 8) & 255}.{i & 255}.0/24" for i in sorted(chosen)]


def random_v6_cidrs(count: int, seed: int = SEED) -> list[str]:
    """`count` distinct IPv6 /48s in 2000::/3, outside 2001:db8::/32."""
    rng = random.Random(seed + 6)
    chosen: set[int] = set()
    while len(chosen) < count:
        prefix = (0b001 << 45) | rng.getrandbits(45)  # the top 48 bits
        if prefix >> 16 != 0x20010DB8:
            chosen.add(prefix)
    return [f"{p >> 32:x}:{(p >> 16) & 0xFFFF:x}:{p & 0xFFFF:x}::/48" for p in sorted(chosen)]


def replace_v4_lines(lines: Sequence[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """`lines` (a list file body) with `count` of its IPv4 /24 lines, chosen at random, replaced by
    other random /24s that are in no line yet (nor adjacent, nor reserved): a realistic update of
    a big list. Returns the new body and the new /24s."""
    rng = random.Random(seed)
    taken = {_v4_index(line) for line in lines if _is_v4(line)}
    targets = rng.sample([i for i, line in enumerate(lines) if _is_v4(line)], count)
    out, added = list(lines), []
    for i in targets:
        while True:
            index = rng.randrange(1 << 15, 224 << 15) * 2
            if index not in taken and not _reserved24(index):
                break
        taken.add(index)
        out[i] = f"{index >> 16}.{(index >> 8) & 255}.{index & 255}.0/24"
        added.append(out[i])
    return out, added


def _is_v4(line: str) -> bool:
    return line.endswith("/24") and ":" not in line


def _v4_index(line: str) -> int:
    a, b, c, _ = line.split("/")[0].split(".")
    return (int(a) << 16) | (int(b) << 8) | int(c)


def bypass_lines(v4: int, v6: int, extra: Sequence[str] = (), seed: int = SEED) -> list[str]:
    """A mixed list file body (shuffled, with a comment and a blank line, as real lists look);
    another `seed` makes a whole new list of the same size."""
    lines = random_v4_cidrs(v4, seed) + random_v6_cidrs(v6, seed) + list(extra)
    random.Random(seed + 1).shuffle(lines)
    return ["# generated by bench/benchlib.py", "", *lines]


def bench_state(user: AddressSet, lan_links: Sequence[str] = ("lan0",)) -> NftState:
    """What the daemon would build: reserved + user bypass, one lan link, one local subnet each."""
    local = address_set(
        [Interval(0xC0000200, 0xC00002FF)],  # 192.0.2.0/24
        [Interval(0x20010DB8000100000000000000000000, 0x20010DB800010000FFFFFFFFFFFFFFFF)],
    )
    return NftState(
        settings=TproxySettings(),
        bypass=union(RESERVED, user),
        lan_links=frozenset(lan_links),
        host_links=frozenset(),
        local=local,
    )


# --- reports ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    measured: str
    met: bool


@dataclass
class Report:
    title: str
    body: str
    goals: list[Goal] = field(default_factory=list)

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body.strip()}\n"


def save_results(name: str, data: dict[str, Any]) -> Report:
    """Write the raw results to bench/results/NAME.json; the report is bench/render.py's table of them
    (the one renderer), printed by a benchmark run on its own."""
    import render

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"benchmark": name, **data}, indent=1) + "\n")
    text, goals = getattr(render, name)(data)
    return Report(name, text, [Goal(*g) for g in goals])


def print_report(report: Report) -> None:
    import render

    print(report.markdown())
    if report.goals:
        print(render.goal_table([(g.name, g.target, g.measured, g.met) for g in report.goals]))


# --- entry point ----------------------------------------------------------------------------------

Option = tuple[str, Any, str]  # flag, default (its type is the option's), help without the default


def bench_parser(doc: str | None, *options: Option) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its docstring as the description, and `options` that take
    a value, each help text ending with the default. Flags of other kinds are added by the caller."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, text in options:
        parser.add_argument(flag, type=type(default), default=default, help=f"{text} (default {default})")
    return parser


def bench_main(
    argv: Sequence[str],
    parse_args: Callable[[Sequence[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace], Report],
    worker: Callable[[dict[str, Any]], Any] | None = None,
) -> int:
    """A benchmark script's `main`. Started as `--worker JSON` (by `run_worker`, inside a namespace),
    it runs `worker` on those parameters and prints the result as its last stdout line (`emit`).
    Otherwise it is the parent: it needs root, turns SIGTERM into SystemExit (so every namespace
    is deleted) and prints the report of `run(parse_args(argv))`."""
    if worker is not None:
        params = worker_main(argv)
        if params is not None:
            emit(worker(params))
            return 0
    require_root()
    terminate_on_sigterm()
    print_report(run(parse_args(argv)))
    return 0
