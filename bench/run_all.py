"""Run every benchmark and rewrite BENCHMARKS.md with their tables.

Each benchmark runs with its own defaults unless given arguments, e.g.
  .venv/bin/python bench/run_all.py --toggle "--repeat 100" --only toggle,reaction
The file records the date, the machine (nproc, kernel, nft version, load) and this exact command.
Run as root from the repository root: .venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import core_start
import dataplane
import dbus_calls
import full_apply
import nm_reaction
import reaction
import toggle
from benchlib import ROOT, Goal, Report, goal_table, log, require_root, sh, terminate_on_sigterm

FAILED = "failed to run"
BENCHMARKS: dict[str, ModuleType] = {
    "full_apply": full_apply,
    "toggle": toggle,
    "reaction": reaction,
    "dataplane": dataplane,
    "dbus_calls": dbus_calls,
    "core_start": core_start,
    "nm_reaction": nm_reaction,
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="default: BENCHMARKS.md")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset (default: all)")
    for name in BENCHMARKS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, default="", metavar="ARGS", help=f"arguments for bench/{name}.py, one string")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def machine() -> list[tuple[str, str]]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", cpu),
        ("kernel", platform.release()),
        ("nft", sh("nft", "--version").strip()),
        ("python", platform.python_version()),
        ("OS", _os_release()),
    ]


def _os_release() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "unknown"


def code_version() -> str:
    """The commit measured, and whether the package had uncommitted changes at the start."""
    commit = sh("git", "-C", str(ROOT), "log", "-1", "--format=%h %s", check=False).strip() or "unknown"
    dirty = sh("git", "-C", str(ROOT), "status", "--porcelain", "--", "tproxy_service", check=False).strip()
    return f"`{commit}`" + (" + uncommitted changes in tproxy_service/" if dirty else "")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def command_line() -> str:
    python = Path(sys.executable)
    shown = os.path.relpath(python, Path.cwd()) if python.is_relative_to(Path.cwd()) else str(python)
    return shlex.join([shown, *sys.argv])


def run_one(name: str, module: ModuleType, extra: str) -> Report:
    log(f"run_all: {name} {extra}".rstrip())
    try:
        report: Report = module.run(module.parse_args(shlex.split(extra)))
    except Exception as e:
        traceback.print_exc()
        failed = Goal(f"{name} ran", "completes", FAILED, False)
        return Report(name, f"**This benchmark failed**: `{e}` (see the run's stderr).", [failed])
    return report


def render(reports: list[Report], started: datetime.datetime, seconds: float, loads: tuple[str, str], code: str) -> str:
    facts = "\n".join(f"- {key}: {value}" for key, value in machine())
    goals = [goal for report in reports for goal in report.goals]
    missed = sum(not goal.met for goal in goals)
    verdict = "all goals met" if not missed else f"**{missed} of {len(goals)} goals missed** (explained below)"
    sections = "\n".join(report.markdown() for report in reports)
    return f"""# Benchmarks

Produced by `bench/run_all.py` (docs/architecture.md, "Benchmarks"; issues 2, 3 and 4). Every number comes from one
run of the command below; each benchmark ran in fresh network namespaces of its own (`tpb-*`;
`tpd-*` for the D-Bus calls, `tpc-*` for the core), with `time.perf_counter()`. Scripts:
`bench/full_apply.py`, `bench/toggle.py`, `bench/reaction.py`, `bench/dataplane.py`,
`bench/dbus_calls.py`, `bench/core_start.py` (each runs on its own; `--help` explains it). Times in
ms unless stated.

- date: {started.strftime("%Y-%m-%d %H:%M UTC")} (took {seconds / 60:.1f} min)
- command (as root, from the repository root): `{command_line()}`
- code: {code}
{facts}
- load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}. This is a shared 2-core VM:
  other work running at the same time shows up as noise, mostly in max/p99 columns.

## Summary: {verdict}

{goal_table(goals)}

{sections}
## History

- Before commit 3358d68, `SetElementWriter.apply` opened and closed a netlink socket per call.
  Closing an nf_tables socket right after a transaction that deleted something blocked for whole
  4 ms timer ticks (HZ=250) while the kernel ran its deferred destroy work, so every link-toggle or
  local-subnet *remove* took 15.8 ms p50 (p99 20-28 ms) at every bypass size, while the same batch
  on a kept-open socket took 0.01 ms. Since 3358d68 the writer keeps its socket open.
"""


def main(argv: Sequence[str]) -> int:
    require_root()
    terminate_on_sigterm()
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    load_start = loadavg()
    code = code_version()
    clock = time.perf_counter()
    reports = [run_one(name, BENCHMARKS[name], getattr(args, name)) for name in args.only.split(",")]
    text = render(reports, started, time.perf_counter() - clock, (load_start, loadavg()), code)
    args.output.write_text(text)
    log(f"run_all: wrote {args.output}")
    print(text)
    # A missed goal is a result, not an error; a benchmark that could not run is.
    return 1 if any(goal.measured == FAILED for r in reports for goal in r.goals) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
