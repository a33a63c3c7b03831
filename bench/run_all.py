"""Run the chosen benchmarks, then bench/render.py: BENCHMARKS.md's generated tables are refreshed.

Each benchmark writes its raw samples to bench/results/NAME.json. Then every results file is
rendered into its `<!-- generated: NAME -->` ... `<!-- end: NAME -->` section of BENCHMARKS.md, with
the goal verdicts (section `goals`) and the facts of this run (section `run`: date, this exact
command, the commit, the machine, the load average at start and end: the machine may be shared).
Text outside the markers is written by hand and never touched; a section without a results file
keeps its table. Each benchmark runs with its own defaults unless given arguments, e.g.
  .venv/bin/python bench/run_all.py --only toggle,reaction --toggle "--repeat 100"
`make bench` runs them all. Run as root from the repository root.
Exit status 1 when a benchmark could not run (a missed goal is a result, not an error).
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
import footprint
import full_apply
import nm_reaction
import reaction
import render
import toggle
from benchlib import RESULTS, ROOT, log, require_root, sh, terminate_on_sigterm

BENCHMARKS: dict[str, ModuleType] = {
    "full_apply": full_apply,
    "toggle": toggle,
    "reaction": reaction,
    "dataplane": dataplane,
    "footprint": footprint,
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


def run_one(name: str, module: ModuleType, extra: str) -> bool:
    """Run one benchmark (it writes bench/results/NAME.json); False when it could not run."""
    log(f"run_all: {name} {extra}".rstrip())
    try:
        module.run(module.parse_args(shlex.split(extra)))
    except Exception:
        traceback.print_exc()
        return False
    return True


def run_facts(started: datetime.datetime, seconds: float, loads: tuple[str, str], code: str, failed: list[str]) -> str:
    facts = [
        ("date", f"{started.strftime('%Y-%m-%d %H:%M UTC')} (took {seconds / 60:.1f} min)"),
        ("command (as root, from the repository root)", f"`{command_line()}`"),
        ("code", code),
        *machine(),
        ("load average (1/5/15 min)", f"at start {loads[0]}; at end {loads[1]}"),
    ]
    if failed:
        facts.append(("**failed to run** (their tables, if any, are from an earlier run)", ", ".join(failed)))
    return "\n".join(f"- {key}: {value}" for key, value in facts)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)  # first: --help needs no root
    require_root()
    terminate_on_sigterm()
    started = datetime.datetime.now(datetime.UTC)
    load_start = loadavg()
    code = code_version()
    clock = time.perf_counter()
    chosen = args.only.split(",")
    failed = [name for name in chosen if not run_one(name, BENCHMARKS[name], getattr(args, name))]
    document, goals = render.render_all(RESULTS, args.output.read_text())
    goals += [(f"{name} ran", "completes", "failed to run", False) for name in failed]
    facts = run_facts(started, time.perf_counter() - clock, (load_start, loadavg()), code, failed)
    document = render.replace_section(document, "run", facts)
    args.output.write_text(render.replace_section(document, "goals", render.goal_table(goals)))
    log(f"run_all: wrote {args.output}")
    # A missed goal is a result, not an error; a benchmark that could not run is.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
