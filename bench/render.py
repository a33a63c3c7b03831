"""The one renderer: BENCHMARKS.md's generated tables from the benchmarks' JSON results.

Each benchmark writes its raw samples to bench/results/NAME.json; this script turns them into
tables (min/median/max, ratios to the baseline measured in the same run, goals met or missed)
and replaces the text between `<!-- generated: NAME -->` and `<!-- end: NAME -->` in
BENCHMARKS.md. Everything outside those markers (the narrative) is written by hand.

  .venv/bin/python bench/render.py [--results bench/results] [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FULL_APPLY_GOAL = 0.5  # x nft -f
RSS_GOAL_MB = 50.0
READY_GOAL_S = 0.5
RELOAD_UNCHANGED_GOAL_MS = 50.0
RELOAD_CHANGED_GOAL = 0.5  # x nft -f of the same list (full_apply, steady)

Goal = tuple[str, str, str, bool]  # name, target, measured, met


def _n(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _spread(values: Sequence[float]) -> list[str]:
    return [_n(min(values)), _n(statistics.median(values)), _n(max(values))]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def goal_table(goals: Sequence[Goal]) -> str:
    rows = [[name, target, measured, "met" if met else "**missed**"] for name, target, measured, met in goals]
    return table(["goal", "target", "measured", "verdict"], rows)


# --- full apply ---------------------------------------------------------------------------------


def nft_f_median_ms(data: dict[str, Any], v4: int) -> float | None:
    for r in data["results"]:
        if r["v4"] == v4:
            return float(statistics.median(r["samples"]["nft -f/steady"]))
    return None


def full_apply(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    rows, prep, goals = [], [], []
    for r in data["results"]:
        label = f"{r['v4']:,} + {r['v6']:,}"
        for mode in ("steady", "empty"):
            base = r["samples"][f"nft -f/{mode}"]
            for path in ("ours", "libnftables, pre-encoded JSON", "nft -f"):
                s = r["samples"][f"{path}/{mode}"]
                ratios = [min(s) / min(base), statistics.median(s) / statistics.median(base)]
                rows.append([label, mode, path, str(len(s)), *_spread(s), *(f"{x:.2f}x" for x in ratios)])
            ours = r["samples"][f"ours/{mode}"]
            value = statistics.median(ours) / statistics.median(base)
            goals.append(
                (
                    f"full apply {label}, {mode}",
                    f"<= {FULL_APPLY_GOAL}x nft -f",
                    f"{value:.2f}x",
                    value <= FULL_APPLY_GOAL,
                )
            )
        for step, key in (("parse list file", "parse"), ("JSON document with elements", "build")):
            prep.append([label, step, str(len(r[key])), *_spread(r[key])])
        if not r["identical"]:
            prep.append([label, "**nft -f's re-listing differed from ours: comparison suspect**", "", "", "", ""])
    heads = [
        "IPv4 + IPv6 CIDRs",
        "start",
        "path",
        "n",
        "min ms",
        "median ms",
        "max ms",
        "ratio (min)",
        "ratio (median)",
    ]
    text = (
        table(heads, rows) + "\n\n" + table(["IPv4 + IPv6 CIDRs", "step", "n", "min ms", "median ms", "max ms"], prep)
    )
    return text, goals


# --- footprint ----------------------------------------------------------------------------------


def footprint(data: dict[str, Any], nft_f_ms: Callable[[int], float | None]) -> tuple[str, list[Goal]]:
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in data["samples"]:
        by.setdefault((s["variant"], s["v4"]), []).append(s)
    rows, goals = [], []
    for (variant, v4), runs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0] != "ours")):
        changed = [x * 1000 for r in runs for x in r["reload_changed_s"]]
        rows.append(
            [
                f"{v4:,}" + (f" + {data['v6']:,}" if v4 else ""),
                variant,
                str(len(runs)),
                *(
                    "/".join(_spread([r[k][m] / 1024 for r in runs]))
                    for k in ("settled", "after_reloads")
                    for m in ("rss", "uss")
                ),
                "/".join(_spread([r["ready_s"] for r in runs])),
                "/".join(_spread([r["reload_unchanged_s"] * 1000 for r in runs])),
                "/".join(_spread(changed)) if changed else "-",
            ]
        )
    top = max(v4 for _, v4 in by)
    ours = by.get(("ours", top), [])
    if ours:
        settled = statistics.median(r["settled"]["rss"] / 1024 for r in ours)
        after = statistics.median(r["after_reloads"]["rss"] / 1024 for r in ours)
        ready = statistics.median(r["ready_s"] for r in ours)
        unchanged = statistics.median(r["reload_unchanged_s"] * 1000 for r in ours)
        changed = statistics.median(x * 1000 for r in ours for x in r["reload_changed_s"])
        label = f"{top:,} + {data['v6']:,}"
        goals += [
            (f"RSS settled, {label}", f"<= {RSS_GOAL_MB:.0f} MB", f"{settled:.1f} MB", settled <= RSS_GOAL_MB),
            (
                f"RSS after {data['reloads']} Reloads of a changed list",
                f"<= {RSS_GOAL_MB:.0f} MB, no growth",
                f"{after:.1f} MB (+{after - settled:.1f})",
                after <= RSS_GOAL_MB,
            ),
            (f"start to ready, {label}", f"<= {READY_GOAL_S} s", f"{ready:.2f} s", ready <= READY_GOAL_S),
            (
                "Reload, list unchanged",
                f"<= {RELOAD_UNCHANGED_GOAL_MS:.0f} ms",
                f"{unchanged:.1f} ms",
                unchanged <= RELOAD_UNCHANGED_GOAL_MS,
            ),
        ]
        base = nft_f_ms(top)
        if base:
            value = changed / base
            goals.append(
                (
                    "Reload, list changed (SIGHUP -> new entry in the kernel)",
                    f"<= {RELOAD_CHANGED_GOAL}x nft -f (full apply, steady, median)",
                    f"{changed:.0f} ms = {value:.2f}x",
                    value <= RELOAD_CHANGED_GOAL,
                )
            )
        idle = [r for r in ours if "idle_switches" in r]
        if idle:
            goals.append(
                (
                    f"idle wake-ups over {idle[0]['idle_s']:.0f} s (unsupervised core)",
                    "0",
                    str(idle[0]["idle_switches"]),
                    idle[0]["idle_switches"] == 0,
                )
            )
    idle_rows = [
        [r["variant"], f"{r['idle_s']:.0f}", str(r["idle_switches"])] for r in data["samples"] if "idle_switches" in r
    ]
    heads = [
        "IPv4 + IPv6 CIDRs",
        "code",
        "n",
        "RSS settled MB",
        "USS settled MB",
        "RSS after Reloads MB",
        "USS after Reloads MB",
        "start to ready s",
        "Reload unchanged ms",
        "Reload changed ms",
    ]
    text = "Each cell: min/median/max.\n\n" + table(heads, rows)
    if idle_rows:
        text += "\n\n" + table(["code", "seconds", "context switches (all threads)"], idle_rows)
    return text, goals


# --- data plane ---------------------------------------------------------------------------------

DATAPLANE_GOALS = {"none": 0.93, "guide": 1.0}  # bypassed flow / baseline, medians
DATAPLANE_LABELS = {
    "none": "no ruleset (baseline)",
    "guide": "the v2ray guide's hand-written ruleset (baseline)",
    "loaded": "tproxyd",
    "loaded_baseline": "tproxyd, baseline code (before)",
    "conntrack": "diagnostic: conntrack only (one `ct state new` rule)",
    "small": "diagnostic: tproxyd, bypass list = only the server's /24",
}


def dataplane(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    medians = {n: statistics.median(data[n]) for n in DATAPLANE_LABELS if n in data}
    rows = []
    for name, label in DATAPLANE_LABELS.items():
        if name in data:
            values = data[name]
            ratios = [f"{medians[name] / medians[b]:.2f}x" if b in medians else "-" for b in ("none", "guide")]
            rows.append([label, str(len(values)), *(f"{v:.2f}" for v in _spread_raw(values)), *ratios])
    goals: list[Goal] = []
    for base, target in DATAPLANE_GOALS.items():
        if base in medians:
            value = medians["loaded"] / medians[base]
            name = f"bypassed flow, {data['bypass']:,} loaded, vs {DATAPLANE_LABELS[base]}"
            goals.append((name, f">= {target}x (medians)", f"{value:.2f}x", value >= target))
    control = "held in every run" if data.get("controls_ok", [0])[0] else "**FAILED: results invalid**"
    heads = ["condition", "n", "min Gbit/s", "median Gbit/s", "max Gbit/s", "vs no ruleset", "vs guide"]
    return f"Control (the ruleset is in the path): {control}.\n\n" + table(heads, rows), goals


def _spread_raw(values: Sequence[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


# --- BENCHMARKS.md ------------------------------------------------------------------------------


def replace_section(document: str, name: str, text: str) -> str:
    pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)
    if not pattern.search(document):
        raise SystemExit(f"BENCHMARKS.md has no '<!-- generated: {name} -->' ... '<!-- end: {name} -->' section")
    return pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), document)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    document = args.output.read_text()
    goals: list[Goal] = []
    apply_data = None
    apply_file = args.results / "full_apply.json"
    if apply_file.exists():
        apply_data = json.loads(apply_file.read_text())
        text, found = full_apply(apply_data)
        document = replace_section(document, "full_apply", text)
        goals += found
    footprint_file = args.results / "footprint.json"
    if footprint_file.exists():
        data = json.loads(footprint_file.read_text())
        text, found = footprint(data, lambda v4: nft_f_median_ms(apply_data, v4) if apply_data else None)
        document = replace_section(document, "footprint", text)
        goals += found
    dataplane_file = args.results / "dataplane.json"
    if dataplane_file.exists():
        text, found = dataplane(json.loads(dataplane_file.read_text()))
        document = replace_section(document, "dataplane", text)
        goals += found
    document = replace_section(document, "goals", goal_table(goals))
    args.output.write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
