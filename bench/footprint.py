"""Footprint: tproxyd's memory, start to ready, Reloads and idle wake-ups with big bypass lists.

For each variant of the code (`ours` = this tree; `--baseline DIR` = the tproxy_service package
under DIR, e.g. `git archive main tproxy_service | tar -x -C DIR`), interleaved in one run, and
for each list size (IPv4 /24s + 2k IPv6 /48s; 0 = no list), in a fresh namespace with one lan
link (a veth), unsupervised core:
  * start to ready: process start -> the `tproxyd ready` log line; then a restart to ready
    with the list unchanged (its parse kept in state_dir);
  * RSS and USS (private pages, /proc/PID/smaps_rollup) settled 2 s after ready;
  * Reload (SIGHUP) of an unchanged list: -> the `config from PATH in place` line;
  * Reloads of a changed list, -> one of its new entries is in the kernel's bypass set (a
    GETSETELEM lookup every 2 ms from a process in the namespace): `--reloads` updates (the
    first list with 1% of its IPv4 lines replaced, as a daily update of a real list changes it),
    then `--reloads` whole new lists (another random list each); RSS right after each, and
    RSS/USS settled after them all;
  * idle: context switches of all its threads over `--idle` seconds (largest size, first run).
Writes the raw samples as JSON (`--json`, default bench/results/footprint.json); `bench/render.py`
turns them into BENCHMARKS.md's tables.

Run as root: .venv/bin/python bench/footprint.py --baseline /tmp/base [--repeat 3] [--sizes 0,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    NS_PREFIX,
    PYTHON,
    ROOT,
    SEED,
    TPROXYD,
    Daemon,
    Report,
    bench_main,
    bench_parser,
    bypass_lines,
    idle_wakeups,
    in_ns,
    log,
    netns,
    random_v4_cidrs,
    write_config,
)

RESULTS = ROOT / "bench" / "results" / "footprint.json"
# The baseline's package, found before this tree's (an editable install puts its finder first).
_BASELINE_LAUNCHER = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f)]; "
    "sys.path.insert(0, sys.argv.pop(1)); from tproxy_service.daemon import main; sys.exit(main())"
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser(
        __doc__,
        ("--sizes", "0,10000,100000", "IPv4 /24 counts"),
        ("--v6", 2000, "IPv6 /48s with a list"),
        ("--repeat", 3, "runs per variant and size"),
        ("--reloads", 3, "changed-list Reloads per run"),
        ("--idle", 60.0, "idle window in seconds (the daemon has no bus here)"),
        ("--json", RESULTS, "raw results"),
    )
    parser.add_argument("--baseline", type=Path, help="directory holding the baseline's tproxy_service package")
    return parser.parse_args(argv)


def memory_kb(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()

    def field(text: str, name: str) -> int:
        match = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) if match else 0

    uss = field(rollup, "Private_Clean") + field(rollup, "Private_Dirty")
    return {"rss": field(status, "VmRSS"), "uss": uss}


def write_list(path: Path, v4: int, v6: int, seed_offset: int) -> str | None:
    """The list file; returns one of its IPv4 entries' first address (a probe), None when empty."""
    if v4 == 0:
        path.write_text("# empty\n")
        return None
    lines = bypass_lines(v4, v6) if seed_offset == 0 else [*random_v4_cidrs(v4, SEED + seed_offset), ""]
    path.write_text("\n".join(lines) + "\n")
    return next(line for line in lines if line and not line.startswith("#") and ":" not in line).split("/")[0]


def write_update(path: Path, v4: int, v6: int, update: int) -> str:
    """The first list (write_list's offset 0) with 1% of its IPv4 lines replaced by other /24s;
    returns one new entry's first address (a probe)."""
    lines = bypass_lines(v4, v6)
    taken = set(lines)
    fresh = [c for c in random_v4_cidrs(v4, SEED + 1000 + update) if c not in taken][: max(1, v4 // 100)]
    ipv4_lines = [i for i, line in enumerate(lines) if "/" in line and ":" not in line]
    for index, cidr in zip(random.Random(SEED + update).sample(ipv4_lines, len(fresh)), fresh, strict=True):
        lines[index] = cidr
    path.write_text("\n".join(lines) + "\n")
    return fresh[0].split("/")[0]


def wait_for(condition: Any, timeout: float, what: str, every: float = 0.005) -> float:
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)
    return time.perf_counter() - start


def probe_main(address: str) -> int:
    """Inside the namespace: say `ready`, then poll nf_tables for `address` as an element of the
    bypass set (one GETSETELEM: a kernel lookup, whatever the set holds) until it is there."""
    import socket

    from tproxy_service.kernel.netlink_wire import NLMSG_ERROR, attr, messages, nested
    from tproxy_service.kernel.nft_netlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, _message

    key = nested(1, nested(1, attr(1, socket.inet_aton(address))))  # LIST_ELEM { KEY { VALUE } }
    payload = attr(1, b"tproxyd\0") + attr(2, b"bypass4\0") + nested(3, key)
    request = _message((NFNL_SUBSYS_NFTABLES << 8) | 13, 0x1 | 0x4, 1, 1, 0, payload)  # GETSETELEM
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        print("ready", flush=True)
        while True:
            sock.send(request)
            found = True
            for msg in messages(sock.recv(65536)):
                if msg.kind == NLMSG_ERROR and msg.error_code():
                    found = False
            if found:
                print("found", flush=True)
                return 0
            time.sleep(0.002)


class Variant(Daemon):
    def __init__(self, ns: str, config: Path, baseline: Path | None) -> None:
        super().__init__(ns, config)
        self.baseline = baseline

    def command(self) -> list[str]:
        if self.baseline is None:
            return [TPROXYD, "--config", str(self.config)]
        return [PYTHON, "-c", _BASELINE_LAUNCHER, str(self.baseline), "--config", str(self.config)]


def one_run(
    ns: str, tmp: Path, variant: str, baseline: Path | None, v4: int, idle: float, args: argparse.Namespace
) -> dict[str, Any]:
    in_ns(ns, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p")
    in_ns(ns, "ip", "link", "set", "lan0", "up")
    lists = tmp / "bypass.txt"
    write_list(lists, v4, args.v6 if v4 else 0, 0)
    config = tmp / "tproxyd.toml"
    write_config(config, lists, {"lan0": "lan"})
    daemon = Variant(ns, config, baseline)
    out: dict[str, Any] = {"variant": variant, "v4": v4}
    try:
        out["ready_s"] = daemon.start()
        daemon.stop()  # a restart with the same list: its parse is kept in state_dir (list_cache.py)
        out["restart_ready_s"] = daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        time.sleep(2.0)  # settle: what the daemon keeps, not what it passed through
        out["settled"] = memory_kb(pid)
        reloaded = sum(" in place" in line for line in daemon.stderr_lines)
        start = time.perf_counter()
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sum(" in place" in x for x in daemon.stderr_lines) > reloaded, 60, "the reload")
        out["reload_unchanged_s"] = time.perf_counter() - start
        out["reload_updated_s"], out["reload_changed_s"], out["rss_after_each_kb"] = [], [], []
        for i in range(1, args.reloads + 1 if v4 else 1):
            probe = write_update(lists, v4, args.v6, i)
            out["reload_updated_s"].append(timed_reload(ns, daemon, probe))
            out["rss_after_each_kb"].append(settled_rss_kb(pid))
        for i in range(1, args.reloads + 1 if v4 else 1):
            whole = write_list(lists, v4, 0, i)
            assert whole is not None
            out["reload_changed_s"].append(timed_reload(ns, daemon, whole))
            out["rss_after_each_kb"].append(settled_rss_kb(pid))
        time.sleep(2.0)
        out["after_reloads"] = memory_kb(pid)
        if idle > 0:
            out["idle_switches"] = idle_wakeups(pid, idle)
            out["idle_s"] = idle
    finally:
        daemon.stop()
    return out


def settled_rss_kb(pid: int) -> int:
    """RSS once the Reload's tail (the heap trim after a replace) is over."""
    time.sleep(0.5)
    return memory_kb(pid)["rss"]


def timed_reload(ns: str, daemon: Daemon, probe: str) -> float:
    """SIGHUP -> `probe` is an element of the kernel's bypass set, in seconds."""
    assert daemon.proc is not None
    argv = ["ip", "netns", "exec", ns, PYTHON, __file__, "--probe", probe]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as poller:
        assert poller.stdout is not None
        assert poller.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        daemon.proc.send_signal(signal.SIGHUP)
        assert poller.stdout.readline().strip() == "found"
        return time.perf_counter() - start


def run(args: argparse.Namespace) -> Report:
    variants: list[tuple[str, Path | None]] = [("ours", None)]
    if args.baseline:
        variants.append(("baseline", args.baseline.resolve()))
    samples: list[dict[str, Any]] = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        for i in range(args.repeat):
            idle = args.idle if size == max(sizes) and i == 0 else 0.0
            order = variants if i % 2 == 0 else variants[::-1]
            for name, base in order:
                log(f"footprint: {name}, {size} IPv4, run {i + 1}/{args.repeat}")
                with netns(f"fp{size}") as ns, tempfile.TemporaryDirectory(prefix=NS_PREFIX) as tmp:
                    samples.append(one_run(ns, Path(tmp), name, base, size, idle, args))
    result = {"benchmark": "footprint", "v6": args.v6, "reloads": args.reloads, "samples": samples}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    log(f"footprint: raw results in {args.json}")
    return Report("Footprint", f"raw results: {args.json}")


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--probe"]:
        return probe_main(argv[1])
    return bench_main(argv, parse_args, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
