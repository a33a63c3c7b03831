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
import math
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


# The first Reload of each kind may pay once (the first update: a reader thread's malloc arena; the
# first whole new list: the replace's encode buffers); after it, the same Reload again may not grow.
GROWTH_MB = 1.0


def _each_reload(runs: list[dict[str, Any]]) -> str:
    """The median run's RSS right after each Reload, in MB."""
    series = [r["rss_after_each_kb"] for r in runs if r.get("rss_after_each_kb")]
    if not series:
        return "-"
    middle = sorted(series, key=lambda s: s[-1])[len(series) // 2]
    return ", ".join(f"{kb / 1024:.1f}" for kb in middle)


def _growth(runs: list[dict[str, Any]], reloads: int) -> float:
    """The largest growth, over the runs and the two kinds of Reload (`reloads` updates, then as
    many new lists), from the first Reload of a kind to its last, in MB."""
    series = [r["rss_after_each_kb"] for r in runs if r.get("rss_after_each_kb")]
    kinds = [part for s in series for part in (s[:reloads], s[reloads:]) if part]
    return max(((part[-1] - part[0]) / 1024 for part in kinds), default=0.0)


def footprint(data: dict[str, Any], nft_f_ms: Callable[[int], float | None]) -> tuple[str, list[Goal]]:
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in data["samples"]:
        by.setdefault((s["variant"], s["v4"]), []).append(s)
    rows, goals = [], []
    for (variant, v4), runs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0] != "ours")):
        changed = [x * 1000 for r in runs for x in r["reload_changed_s"]]
        updated = [x * 1000 for r in runs for x in r.get("reload_updated_s", [])]
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
                "/".join(_spread([r["restart_ready_s"] for r in runs if "restart_ready_s" in r])) or "-",
                "/".join(_spread([r["reload_unchanged_s"] * 1000 for r in runs])),
                "/".join(_spread(updated)) if updated else "-",
                "/".join(_spread(changed)) if changed else "-",
            ]
        )
    top = max(v4 for _, v4 in by)
    ours = by.get(("ours", top), [])
    if ours:
        settled = statistics.median(r["settled"]["rss"] / 1024 for r in ours)
        after = statistics.median(r["after_reloads"]["rss"] / 1024 for r in ours)
        ready = statistics.median(r["ready_s"] for r in ours)
        restart = [r["restart_ready_s"] for r in ours if "restart_ready_s" in r]
        unchanged = statistics.median(r["reload_unchanged_s"] * 1000 for r in ours)
        reloads = {
            "1% of its IPv4 lines replaced": [x * 1000 for r in ours for x in r.get("reload_updated_s", [])],
            "a whole new list": [x * 1000 for r in ours for x in r["reload_changed_s"]],
        }
        label = f"{top:,} + {data['v6']:,}"
        goals += [
            (f"RSS settled, {label}", f"<= {RSS_GOAL_MB:.0f} MB", f"{settled:.1f} MB", settled <= RSS_GOAL_MB),
            (
                f"RSS after {2 * data['reloads']} Reloads of a changed list ({data['reloads']} updates, "
                f"{data['reloads']} new lists)",
                f"<= {RSS_GOAL_MB:.0f} MB, no growth (of each kind, the last <= the first + {GROWTH_MB:.0f} MB)",
                f"{after:.1f} MB (settled {settled:.1f}); right after each: {_each_reload(ours)}; "
                f"largest growth {_growth(ours, data['reloads']):+.1f} MB",
                after <= RSS_GOAL_MB and _growth(ours, data["reloads"]) <= GROWTH_MB,
            ),
            (f"start to ready, {label}", f"<= {READY_GOAL_S} s", f"{ready:.2f} s", ready <= READY_GOAL_S),
            *(
                [
                    (
                        f"restart to ready, {label}, list unchanged (its parse kept)",
                        f"<= {READY_GOAL_S} s",
                        f"{statistics.median(restart):.2f} s",
                        statistics.median(restart) <= READY_GOAL_S,
                    )
                ]
                if restart
                else []
            ),
            (
                "Reload, list unchanged",
                f"<= {RELOAD_UNCHANGED_GOAL_MS:.0f} ms",
                f"{unchanged:.1f} ms",
                unchanged <= RELOAD_UNCHANGED_GOAL_MS,
            ),
        ]
        base = nft_f_ms(top)
        for change, samples in reloads.items() if base else ():
            assert base is not None
            if samples:
                median = statistics.median(samples)
                value = median / base
                goals.append(
                    (
                        f"Reload, list changed: {change} (SIGHUP -> new entry in the kernel)",
                        f"<= {RELOAD_CHANGED_GOAL}x nft -f (full apply, steady, median)",
                        f"{median:.0f} ms = {value:.2f}x",
                        value <= RELOAD_CHANGED_GOAL,
                    )
                )
        # The idle goal is judged with the bus (dbus_calls, core_start): without one, tproxyd's
        # attempts to reach it are the wake-ups counted here, a diagnostic only.
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
        "restart to ready s",
        "Reload unchanged ms",
        "Reload 1% changed ms",
        "Reload new list ms",
    ]
    text = "Each cell: min/median/max.\n\n" + table(heads, rows)
    if idle_rows:
        text += (
            "\n\nIdle without a system bus (a diagnostic: the wake-ups are tproxyd's attempts to reach the "
            "bus; the idle goal is judged with the bus, in D-Bus calls and Core start):\n\n"
            + table(["code", "seconds", "context switches (all threads)"], idle_rows)
        )
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


# --- link toggle and local-subnet update --------------------------------------------------------

TOGGLE_GOAL_MS = 2.0
TOGGLE_FLAT_MS = 0.1 * TOGGLE_GOAL_MS  # "flat": growing by at most a tenth of the budget
TOGGLE_KINDS = ("link toggle (lan_links)", "local-subnet update (local4)")
TOGGLE_LARGE = 100_000


def _p99(values: Sequence[float]) -> float:
    """Nearest-rank p99."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(0.99 * len(ordered))) - 1]


def _timing_row(values: Sequence[float]) -> list[str]:
    """n, min, median, p99, max."""
    return [str(len(values)), _n(min(values)), _n(statistics.median(values)), _n(_p99(values)), _n(max(values))]


TIMING_HEADS = ["n", "min ms", "median ms", "p99 ms", "max ms"]


def toggle(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    rows, goals, notes = [], [], []
    results = data["results"]
    smallest = results[0]
    for r in results:
        label = f"{r['size']:,}" + (" + 2,000 v6" if r["size"] else "")
        label += f" ({r['elements4']:,} + {r['elements6']:,} elements)"
        for kind in TOGGLE_KINDS:
            for op in ("add", "remove"):
                ours = statistics.median(r[f"ours/{kind}"][op])
                for path in ("ours", "libnftables"):
                    if f"{path}/{kind}" in r:
                        s = r[f"{path}/{kind}"][op]
                        ratio = statistics.median(s) / ours
                        rows.append([label, kind, op, path, *_timing_row(s), f"{ratio:.2f}x"])
                if r["size"] >= TOGGLE_LARGE:
                    empty = statistics.median(smallest[f"ours/{kind}"][op])
                    growth = ours - empty
                    goals += [
                        (
                            f"{kind} {op}, {r['size']:,} loaded, median",
                            f"<= {TOGGLE_GOAL_MS} ms",
                            f"{_n(ours)} ms",
                            ours <= TOGGLE_GOAL_MS,
                        ),
                        (
                            f"{kind} {op}, flat in bypass size",
                            f"median growth 0 -> {r['size']:,} <= {TOGGLE_FLAT_MS} ms",
                            f"{growth:+.3f} ms",
                            growth <= TOGGLE_FLAT_MS,
                        ),
                    ]
        if not r["verified"]:
            notes.append(f"**{label}: our element writes were NOT seen in the kernel: results invalid.**")
    heads = ["bypass CIDRs loaded", "change", "op", "path", *TIMING_HEADS, "median / ours"]
    return "\n\n".join([table(heads, rows), *notes]), goals


# --- reactions (address change, NetworkManager) -------------------------------------------------

REACTION_GOAL_MS = 20.0
NM_GOAL_P50_MS, NM_GOAL_P99_MS = 50.0, 200.0
DISPATCHER_GOAL_MS = 100.0  # "never delays NetworkManager": far below the 2 s call timeout
ANCHORS = (("sing-box", "debounces 1 s after a change", 1000.0), ("v2rayA", "polls every 3 s (median 1.5 s)", 1500.0))


def _anchored(label: str, values: Sequence[float], *extra: str) -> list[str]:
    """A reaction row: timings, then the median against each anchor's reaction time."""
    median = max(statistics.median(values), 0.001)
    return [label, *extra, *_timing_row(values), *(f"{median / v:.4f}x" for _n_, _m, v in ANCHORS)]


def _anchor_tables(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    anchor_heads = [f"median / {name} ({value / 1000:g} s)" for name, _model, value in ANCHORS]
    anchors = table(["anchor", "reaction model", "median ms"], [[n, m, f"{v:.0f}"] for n, m, v in ANCHORS])
    return table([*heads, *TIMING_HEADS, *anchor_heads], rows) + "\n\n" + anchors


def reaction(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    rows = []
    for op, what in (("add", "address added -> in local4"), ("remove", "address removed -> out of local4")):
        rows.append(_anchored(what, data["samples"][op], str(data["missed"][op])))
    added = statistics.median(data["samples"]["add"])
    goals = [
        (
            "reaction, address added, median",
            f"<= {REACTION_GOAL_MS:.0f} ms",
            f"{_n(added)} ms",
            added <= REACTION_GOAL_MS,
        )
    ]
    facts = f"{data['bypass']:,} IPv4 + 2,000 IPv6 bypass CIDRs; daemon start to ready {data['ready_s']:.2f} s."
    return facts + "\n\n" + _anchor_tables(["event", "missed"], rows), goals


def nm_reaction(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    labels = {
        "activated": "ACTIVATED signal -> link in host_links (signed)",
        "first": "first signal (prepare) -> link in host_links",
        "released": "DEACTIVATING signal -> link out of host_links",
    }
    rows = [_anchored(label, data["samples"][key]) for key, label in labels.items()]
    late = [max(0.0, v) for v in data["samples"]["activated"]]
    p50, p99 = statistics.median(late), _p99(late)
    goals = [
        ("NM ACTIVATED -> rules, median", f"<= {NM_GOAL_P50_MS:.0f} ms", f"{_n(p50)} ms", p50 <= NM_GOAL_P50_MS),
        ("NM ACTIVATED -> rules, p99", f"<= {NM_GOAL_P99_MS:.0f} ms", f"{_n(p99)} ms", p99 <= NM_GOAL_P99_MS),
    ]
    facts = (
        f"{data['bypass']:,} IPv4 + 2,000 IPv6 bypass CIDRs; daemon start to ready {data['ready_s']:.2f} s; "
        f"{data['cycles']} up/down cycles; {data['missed']} steps missed an event within 10 s."
    )
    text = facts + "\n\n" + _anchor_tables(["event"], rows)
    if "dispatcher" in data:
        script = [[f"tproxyd {state}", *_timing_row(values)] for state, values in data["dispatcher"].items()]
        text += "\n\nThe dispatcher script's return time:\n\n" + table(["tproxyd", *TIMING_HEADS], script)
        slowest = max(statistics.median(values) for values in data["dispatcher"].values())
        goals.append(
            (
                "NM dispatcher script returns, median of the slowest tproxyd state",
                f"<= {DISPATCHER_GOAL_MS:.0f} ms",
                f"{_n(slowest)} ms",
                slowest <= DISPATCHER_GOAL_MS,
            )
        )
    return text, goals


# --- D-Bus calls --------------------------------------------------------------------------------

DBUS_TOGGLE_P50_MS, DBUS_TOGGLE_P99_MS, DBUS_GETALL_P50_MS = 10.0, 30.0, 2.0
DBUS_CALLS = {
    "toggle-root": "EnableLink/DisableLink, root",
    "toggle-daemon": "EnableLink/DisableLink, daemon (granted by a polkit JS rule)",
    "getall": "Properties.GetAll, nobody",
    "hung-root": "EnableLink/DisableLink, root, polkitd stopped (SIGSTOP)",
}


RELOAD_GETALL_P99_MS = 20.0
RELOAD_CASES = {
    "update": "1% of the lines replaced",
    "new": "a whole new random list",
}
IDLE_GOAL = 0


def _reload_windows(runs: Sequence[dict[str, Any]], case: str) -> dict[str, list[float]]:
    """The `case` Reloads of every run pooled: their durations, and the GetAll calls (duration)
    that overlap a Reload (start before its reply, end after its call), came before it, or
    started after its reply."""
    out: dict[str, list[float]] = {"reload": [], "during": [], "before": [], "after": []}
    for run in runs:
        sample = run["reloads"][case]
        end = sample["reload_ms"]
        out["reload"].append(end)
        for start, duration in sample["getall"]:
            key = "before" if start + duration <= 0 else "after" if start >= end else "during"
            out[key].append(duration)
    return out


def dbus_reloads(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    """GetAll latency while a Reload of a changed list runs, one row per kind of change."""
    runs = [run for run in data["runs"] if "reloads" in run]
    if not runs:
        return "", []
    v4, v6 = data["bypass"]
    rows, goals = [], []
    for case, label in RELOAD_CASES.items():
        w = _reload_windows(runs, case)
        count = f" ({runs[0]['reloads']['update_lines']:,} /24s)" if case == "update" else ""
        during = w["during"]
        rows.append(
            [
                label + count,
                str(len(w["reload"])),
                "/".join(_spread(w["reload"])),
                _n(statistics.median(w["before"])),
                str(len(during)),
                *(_n(v) for v in (statistics.median(during), _p99(during), max(during))),
                _n(max(w["after"], default=0.0)),
            ]
        )
        p99, longest = _p99(during), max(during)
        goals.append(
            (
                f"GetAll p99 during a Reload of a changed list: {label}",
                f"<= {RELOAD_GETALL_P99_MS:.0f} ms",
                f"{_n(p99)} ms (longest {_n(longest)} ms)",
                p99 <= RELOAD_GETALL_P99_MS,
            )
        )
    heads = [
        "change to the list file",
        "Reloads",
        "Reload ms (min/median/max)",
        "GetAll before it: median ms",
        "GetAll during it: n",
        "median ms",
        "p99 ms",
        "max ms",
        f"GetAll after its reply (<= {data['tail_ms']:g} ms): max ms",
    ]
    text = (
        f"GetAll during a Reload of the {v4:,} + {v6:,} list (root's D-Bus Reload, call -> reply), "
        f"a call started every {data['getall_interval_ms']:g} ms (or right after a late reply):\n\n"
        + table(heads, rows)
    )
    return text, goals


def idle_goal(data: dict[str, Any], setup: str) -> list[Goal]:
    """The idle wake-ups row of a benchmark that measured them (`idle_s`, `idle_switches`)."""
    if "idle_switches" not in data:
        return []
    count = data["idle_switches"]
    return [(f"idle wake-ups over {data['idle_s']:.0f} s, {setup}", str(IDLE_GOAL), str(count), count <= IDLE_GOAL)]


def dbus_calls(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    """Every call's samples of every run pooled; `runs` lists each run's medians apart."""
    runs = data["runs"]
    rows = []
    for key, label in DBUS_CALLS.items():
        if all(key in run for run in runs):
            pooled = [v for run in runs for v in run[key]]
            per_run = "/".join(_n(statistics.median(run[key])) for run in runs)
            rows.append([label, *_timing_row(pooled), per_run])
    rates = [run["parallel_calls"] / run["parallel_s"] for run in runs]
    text = table(["call", *TIMING_HEADS, "median of each run"], rows)
    text += (
        f"\n\nThroughput, {data['clients']} concurrent clients, {2 * data['parallel_pairs']} calls each: "
        f"{'/'.join(f'{r:.0f}' for r in rates)} calls/s (each run); tproxyd's RSS at the end: "
        f"{data['rss_kb'] / 1024:.0f} MB."
    )
    toggles = [v for run in runs for v in run["toggle-root"]]
    getall = statistics.median(v for run in runs for v in run["getall"])
    p50, p99 = statistics.median(toggles), _p99(toggles)
    goals = [
        (
            "EnableLink/DisableLink median (100k bypass)",
            f"<= {DBUS_TOGGLE_P50_MS:.0f} ms",
            f"{_n(p50)} ms",
            p50 <= DBUS_TOGGLE_P50_MS,
        ),
        (
            "EnableLink/DisableLink p99 (100k bypass)",
            f"<= {DBUS_TOGGLE_P99_MS:.0f} ms",
            f"{_n(p99)} ms",
            p99 <= DBUS_TOGGLE_P99_MS,
        ),
        ("GetAll median", f"<= {DBUS_GETALL_P50_MS:.0f} ms", f"{_n(getall)} ms", getall <= DBUS_GETALL_P50_MS),
    ]
    reloads, reload_goals = dbus_reloads(data)
    if reloads:
        text += "\n\n" + reloads
    idle = idle_goal(data, "with the bus, unsupervised core")
    if idle:
        text += (
            f"\n\nIdle, nothing happening (after the runs): {data['idle_switches']} context switches of tproxyd "
            f"(all threads) in {data['idle_s']:g} s."
        )
    return text, goals + reload_goals + idle


# --- core start and recovery --------------------------------------------------------------------

CORE_START_GOAL_MS = 1000.0
# ExecStartPre to the first proxied reply: the same steps after EnableLink and after a SIGKILL.
_CORE_STARTING = (
    ("ExecStartPre run", "pre_start", "pre_exit"),
    ("ExecStartPre exit -> core exec'd (ExecMainStart)", "pre_exit", "main"),
    ("core exec'd -> core listening, IPv4 and IPv6 (v2ray's own start)", "main", "listening"),
    ("core listening -> tproxyd State=active (readiness check, diversion on)", "listening", "state_active"),
    ("State=active -> first proxied reply", "state_active", "total"),
)
CORE_START_PHASES = (
    ("**EnableLink -> first proxied connection**", "", "total"),
    ("EnableLink reply", "", "reply"),
    ("-> unit leaves inactive, ExecStartPre (`v2ray -test`) begins", "", "pre_start"),
    *_CORE_STARTING,
    ("(stop: SetEnabled(false) -> unit inactive)", "", "stop"),
)
CORE_KILL_PHASES = (
    ("**SIGKILL -> first proxied connection again**", "", "total"),
    ("-> unit failed (its PropertiesChanged received)", "", "failed"),
    ("unit failed -> restart timer fired, unit dead", "failed", "dead"),
    ("unit dead -> ExecStartPre begins", "dead", "pre_start"),
    *_CORE_STARTING,
    ("-> tproxyd State degraded (open) or blocked (closed)", "", "outage_state"),
    ("-> first direct reply (open policy)", "", "first_direct"),
)


def _phase(samples: Sequence[dict[str, Any]], start: str, end: str) -> list[float]:
    """end - start of every sample holding both (`""` as start is t0)."""
    return [
        s[end] - (s[start] if start else 0.0)
        for s in samples
        if s.get(end) is not None and (not start or s.get(start) is not None)
    ]


def _phase_table(samples: Sequence[dict[str, Any]], phases: Sequence[tuple[str, str, str]]) -> str:
    rows = []
    for label, start, end in phases:
        values = _phase(samples, start, end)
        if values:
            rows.append([label, *_timing_row(values)])
    return table(["phase (from t0 unless stated)", *TIMING_HEADS], rows)


def _attempt_counts(samples: Sequence[dict[str, Any]]) -> str:
    kinds: dict[str, int] = {}
    for s in samples:
        for kind, count in s["attempts"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    return ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))


def core_start(data: dict[str, Any]) -> tuple[str, list[Goal]]:
    starts, kills = data["starts"], data["kills"]
    both = starts + kills
    restart_ms = data["restart_usec"] / 1000
    holds = sorted(_phase(kills, "failed", "dead"))
    kill_p50 = statistics.median(_phase(kills, "", "total"))
    start_p50 = statistics.median(_phase(starts, "", "total"))
    active = [s for s in both if s.get("state_active") is not None]
    facts = [
        f"failure policy `{data['policy']}`; a connection attempt every {data['interval_ms']:g} ms",
        f"RestartSec = {restart_ms:g} ms (`{data['restart_shown']}`); hold-offs applied (unit failed -> "
        f"timer fired), sorted: {', '.join(f'{h:.0f}' for h in holds)} ms",
        "tproxyd State after EnableLink: " + "; ".join(sorted({" -> ".join(s["states"]) for s in starts})),
        "tproxyd State after a kill: " + "; ".join(sorted({" -> ".join(s["states"]) for s in kills})),
        "unit SubState after a kill: " + ("; ".join(sorted({" -> ".join(s["sub_states"]) for s in kills})) or "-"),
        f"connection attempts after t0 (direct, proxied or the error): start: {_attempt_counts(starts)}; "
        f"kill: {_attempt_counts(kills)}",
        f"samples with a proxied reply before State=active: {sum(s['total'] < s['state_active'] for s in active)}",
        "samples whose socket watch saw the core listening only after State=active: "
        f"{sum(s['not_listening'] <= s['state_active'] < s['listening'] for s in active)}",
        "samples with State=active before a poll that saw the core not listening: "
        f"{sum(s['state_active'] < s['not_listening'] for s in active)}",
        *data["notes"],
    ]
    text = "\n\n".join(
        [
            "**Core start**\n\n" + _phase_table(starts, CORE_START_PHASES),
            "**Core killed**\n\n" + _phase_table(kills, CORE_KILL_PHASES),
            "\n".join(f"- {fact}" for fact in facts),
        ]
    )
    goals = [
        (
            "core start: EnableLink -> first proxied connection, median",
            f"<= {CORE_START_GOAL_MS:.0f} ms",
            f"{_n(start_p50)} ms",
            start_p50 <= CORE_START_GOAL_MS,
        ),
        (
            "core SIGKILL -> proxied again, median (and its RestartSec share)",
            "reported (issue 4 sets no target)",
            f"{_n(kill_p50)} ms; RestartSec {restart_ms:g} ms = {restart_ms / kill_p50:.0%}",
            True,
        ),
        *idle_goal(data, "with the bus, supervised core (up and proxying)"),
    ]
    if "idle_switches" in data:
        text += (
            f"\n\nIdle, core up and proxying, nothing changing: {data['idle_switches']} context switches of "
            f"tproxyd in {data['idle_s']:g} s."
        )
    return text, goals


# --- BENCHMARKS.md ------------------------------------------------------------------------------


def replace_section(document: str, name: str, text: str) -> str:
    pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)
    if not pattern.search(document):
        raise SystemExit(f"BENCHMARKS.md has no '<!-- generated: {name} -->' ... '<!-- end: {name} -->' section")
    return pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), document)


def render_all(results: Path, document: str) -> tuple[str, list[Goal]]:
    """`document` with the section of every benchmark that has a results file (re)generated."""
    goals: list[Goal] = []
    found = {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}
    apply_data = found.get("full_apply")
    renderers: dict[str, Callable[[dict[str, Any]], tuple[str, list[Goal]]]] = {
        "full_apply": full_apply,
        "toggle": toggle,
        "reaction": reaction,
        "nm_reaction": nm_reaction,
        "dbus_calls": dbus_calls,
        "core_start": core_start,
        "dataplane": dataplane,
        "footprint": lambda data: footprint(data, lambda v4: nft_f_median_ms(apply_data, v4) if apply_data else None),
    }
    for name, renderer in renderers.items():
        if name in found:
            text, new = renderer(found[name])
            document = replace_section(document, name, text)
            goals += new
    return document, goals


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    document, goals = render_all(args.results, args.output.read_text())
    args.output.write_text(replace_section(document, "goals", goal_table(goals)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
