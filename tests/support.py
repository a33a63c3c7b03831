"""What the test tiers share (and the demo and benchmarks that reuse their harnesses): running
commands, polling, async tests, stopping our own children, skipping a tier whose prerequisites
are missing, other people's nftables tables for the politeness checks, and the snapshot that
every root tier takes of the main network namespace before and after it runs, to prove it left
the machine as it found it.

Everything here only reads the main namespace; `stop_process` only ever signals our own children."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


# --- processes and waiting ------------------------------------------------------------------------


def run(
    *args: str,
    check: bool = True,
    timeout: float = 30,
    stdin: str | None = None,
    what: str | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run a command (its stdin: the text `stdin`, else /dev/null); `kw` goes to subprocess.run
    (env, cwd). With `check`, a non-zero exit fails, showing the command's output; `what` names
    the command there (default: its command line), e.g. a wrapper's caller's command only."""
    proc = subprocess.run(
        list(args),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{what or ' '.join(args)} failed (rc {proc.returncode})\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def _poll(predicate: Callable[[], T | None], deadline: float, timeout: float, what: str) -> T | None:
    """One look at `predicate`: its value, or AssertionError when it is falsy past `deadline`."""
    value = predicate()
    if not value and time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
    return value


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := _poll(predicate, deadline, timeout, what)):
        time.sleep(interval)
    return value


async def wait_until_async(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.005) -> T:
    """`wait_until` for code running on an event loop: polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not (value := _poll(predicate, deadline, timeout, what)):
        await asyncio.sleep(interval)
    return value


def async_test(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Lets pytest (which has no asyncio plugin here) run an `async def` test: each run gets a
    fresh event loop. pytest still sees the test's own parameters (fixtures, parametrize)."""

    @functools.wraps(test)
    def in_a_new_loop(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return in_a_new_loop


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time. Only ever used on our own children."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


# --- prerequisites --------------------------------------------------------------------------------


def missing_tool(*tools: str, hint: str = "make deps") -> str | None:
    """The first of `tools` (names or paths) that is not an executable here, as a skip reason."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed ({hint})"
    return None


def prerequisites_fixture(
    missing_prerequisite: Callable[[], str | None], scope: Literal["session", "package"] = "session"
) -> object:
    """The tier's `prerequisites` fixture: skips whatever uses it when `missing_prerequisite()`
    names something missing (a failure under TPROXYD_REQUIRE_ALL=1: see tests/conftest.py).
    Assign it in the tier's conftest: `prerequisites = prerequisites_fixture(_missing_prerequisite)`."""
    import pytest  # here, not at the top: the demo and the benchmarks import this module too

    @pytest.fixture(scope=scope, name="prerequisites")
    def prerequisites() -> None:
        missing = missing_prerequisite()
        if missing:
            pytest.skip(missing)

    return prerequisites


# --- other people's nftables tables ---------------------------------------------------------------


def foreign_tables(uplink: str) -> str:
    """nftables tables of someone else (a Docker-like NAT, a filter with a set and a counter), for
    the checks that tproxyd leaves them byte for byte as they were; `uplink` is the NAT's link."""
    return f"""\
table ip nat {{
    chain POSTROUTING {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{uplink}" ip saddr 172.17.0.0/16 masquerade
    }}
}}
table inet filter {{
    set allowed {{
        type ipv4_addr
        elements = {{ 192.0.2.1 }}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip saddr @allowed accept
        counter
    }}
}}
"""


# --- the main namespace must not change -----------------------------------------------------------

_LIFETIMES = re.compile(r"(valid_lft|preferred_lft|expires) \S+")
_NETWORK = {
    "nft ruleset": ("nft", "list", "ruleset"),
    "links": ("ip", "-o", "link"),
    "addresses": ("ip", "-o", "addr"),
    "routes": ("ip", "route", "show", "table", "all"),
    "routes6": ("ip", "-6", "route", "show", "table", "all"),
    "rules": ("ip", "rule"),
    "rules6": ("ip", "-6", "rule"),
}


def _state(*cmd: str) -> str:
    """A command's output; should it fail (e.g. `nft` without root), its exit status and stderr."""
    proc = run(*cmd, check=False)
    return proc.stdout if proc.returncode == 0 else f"{proc.stdout}[rc {proc.returncode}: {proc.stderr.strip()}]"


def network_snapshot() -> dict[str, str]:
    """The main namespace's ruleset, links, addresses, routes and policy rules (address and route
    lifetimes masked: they count down by themselves)."""
    return {name: _LIFETIMES.sub(r"\1 _", _state(*cmd)) for name, cmd in _NETWORK.items()}


def main_namespace_snapshot() -> dict[str, str]:
    """Everything of the main namespace the tests could conceivably disturb."""
    snap = network_snapshot()
    snap["/dev/null mode"] = oct(os.stat("/dev/null").st_mode)
    return snap


def snapshot_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """A `--- KEY before:` / `--- KEY after:` block for every entry of `before` that `after`
    does not have the same."""
    return [
        f"--- {key} before:\n{old}\n--- {key} after:\n{after.get(key)}"
        for key, old in before.items()
        if after.get(key) != old
    ]


def netns_list() -> list[str]:
    """The names of the network namespaces that `ip netns` knows."""
    out = run("ip", "-j", "netns", "list").stdout.strip()
    return [entry["name"] for entry in json.loads(out or "[]")]
