"""Full apply: `NftablesAdapter.replace(state)` vs `nft -f` of the same ruleset text.

For 10k and 100k random IPv4 /24s (+ 2k IPv6 /48s) as a bypass list file, in a fresh namespace
per size:
  * parse: `load_cidr_file` of the list (what the daemon does at start and on reload);
  * build: `build_replace(state)` with the elements as JSON (what libnftables would be fed);
  * replace: `NftablesAdapter.replace(state)` from an already built NftState (one nf_tables
    netlink batch: the builder's JSON skeleton translated, the elements encoded from the packed
    intervals);
  * libnftables, pre-encoded JSON: the same replace through libnftables (the former path);
  * baseline: `nft -f FILE` where FILE is `nft list table inet tproxyd` taken after our replace,
    preceded by `table inet tproxyd` / `delete table inet tproxyd`, so it is the same atomic
    replace of the same table (its re-listing is checked to be identical to ours).
Both are timed as a replace of the already-loaded table (steady) and with no table (empty),
interleaved, alternating which path goes first.

Run as root: .venv/bin/python bench/full_apply.py [--repeat 7] [--repeat-small 15] [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    ROOT,
    Goal,
    Report,
    bench_main,
    bench_parser,
    bench_state,
    bypass_lines,
    log,
    netns,
    run_worker,
)
from render import full_apply as render_full_apply

RESULTS = ROOT / "bench" / "results" / "full_apply.json"
GOAL = 0.5
BORDER = 0.05  # within this of the goal, explain where the time goes too
TABLE_CMD = "inet tproxyd"
LIB_ONLY = "libnftables, pre-encoded JSON"
PATHS = ("ours", LIB_ONLY, "nft -f")
MODES = ("steady", "empty")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return bench_parser(
        __doc__,
        ("--repeat", 7, "timed runs per path and mode, sizes >= 50k"),
        ("--repeat-small", 15, "timed runs per path and mode, sizes < 50k"),
        ("--sizes", "10000,100000", "IPv4 /24 counts, comma separated"),
        ("--v6", 2000, "IPv6 /48 count"),
        ("--json", RESULTS, "raw results"),
    ).parse_args(argv)


# --- worker (inside the namespace) --------------------------------------------------------------


def timed_ms(func: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    func()
    return (time.perf_counter() - start) * 1000


def worker(params: dict[str, Any]) -> dict[str, Any]:
    import nftables

    from tproxy_service.kernel.nft import NftablesAdapter
    from tproxy_service.list_files import load_cidr_file
    from tproxy_service.rules.nft import build_replace

    repeat = int(params["repeat"])
    nft = nftables.Nftables()
    with tempfile.TemporaryDirectory(prefix="tpb-apply-") as tmp:
        list_file = Path(tmp) / "bypass.txt"
        list_file.write_text("\n".join(bypass_lines(params["v4"], params["v6"])) + "\n")
        parse = [timed_ms(lambda: load_cidr_file(list_file)) for _ in range(repeat)]
        state = bench_state(load_cidr_file(list_file))
        build = [timed_ms(lambda: build_replace(state)) for _ in range(repeat)]
        document = build_replace(state)
        dumps = [timed_ms(lambda: json.dumps(document)) for _ in range(repeat)]
        encoded = json.dumps(document)
        json_ctx = nftables.Nftables()
        json_ctx.set_json_output(True)  # as the adapter's context: JSON in, JSON out
        json_ctx.set_handle_output(False)

        adapter = NftablesAdapter()
        loop = asyncio.new_event_loop()

        def ours() -> None:
            loop.run_until_complete(adapter.replace(state))

        ours()  # warm-up, and the source of the baseline's text
        rc, listing, error = nft.cmd(f"list table {TABLE_CMD}")
        assert rc == 0, error
        ruleset = Path(tmp) / "ruleset.nft"
        ruleset.write_text(f"table {TABLE_CMD}\ndelete table {TABLE_CMD}\n{listing}")

        def baseline() -> None:
            subprocess.run(["nft", "-f", str(ruleset)], check=True)

        baseline()  # warm-up; and the baseline must load exactly what we load
        identical = nft.cmd(f"list table {TABLE_CMD}")[1] == listing

        def lib_only() -> None:
            rc, _out, error = json_ctx.cmd(encoded)
            assert rc == 0, error

        def empty() -> None:
            rc, _out, error = nft.cmd(f"delete table {TABLE_CMD}")
            assert rc == 0, error

        samples: dict[str, list[float]] = {f"{p}/{m}": [] for p in PATHS for m in MODES}
        for i in range(repeat):
            order = [("ours", ours), (LIB_ONLY, lib_only), ("nft -f", baseline)]
            order = order[i % 3 :] + order[: i % 3]
            for mode in MODES:
                for name, func in order:
                    if mode == "empty":
                        empty()
                    samples[f"{name}/{mode}"].append(timed_ms(func))
            log(f"full_apply {params['v4']}: run {i + 1}/{repeat} done")
        adapter.close()
        loop.close()
    return {
        "v4": params["v4"],
        "v6": params["v6"],
        "elements4": len(state.bypass.v4),
        "elements6": len(state.bypass.v6),
        "ruleset_bytes": ruleset.stat().st_size if ruleset.exists() else len(listing),
        "identical": identical,
        "parse": parse,
        "build": build,
        "dumps": dumps,
        "samples": samples,
    }


# --- parent -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        log(f"full_apply: {size} IPv4 + {args.v6} IPv6 bypass CIDRs")
        with netns(f"apply{size}") as ns:
            repeat = args.repeat if size >= 50_000 else args.repeat_small
            results.append(run_worker(ns, __file__, {"v4": size, "v6": args.v6, "repeat": repeat}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "full_apply", "results": results}, indent=1) + "\n")
    return render(results)


def render(results: list[dict[str, Any]]) -> Report:
    """The tables come from bench/render.py (the one renderer); the narrative is in BENCHMARKS.md."""
    text, goals = render_full_apply({"results": results})
    return Report("Full apply", text, [Goal(*g) for g in goals])


def main(argv: Sequence[str]) -> int:
    return bench_main(argv, parse_args, run, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
