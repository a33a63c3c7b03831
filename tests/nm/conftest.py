"""Fixtures for the NetworkManager tier: a fresh world (namespaces, sandboxed NetworkManager on its
private bus, v2ray, tproxyd handle) per test, and a session check that the machine's main
namespace, hostname, mounts and NetworkManager directories are as they were.
(Skips become failures under TPROXYD_REQUIRE_ALL=1: see tests/conftest.py.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import harness as e2e

from . import harness as h

pytestmark = pytest.mark.root


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, mount namespaces, NetworkManager)"
    for path in (h.NETWORKMANAGER, h.NMCLI, h.NM_DISPATCHER, h.NM_DISPATCHER_SERVICE, Path("/usr/sbin/dnsmasq")):
        if not path.exists():
            return f"{path} is missing (network-manager package; make deps)"
    for policy in h.NM_BUS_POLICIES:
        if not (h.SYSTEM_BUS_POLICIES / policy).exists():
            return f"{h.SYSTEM_BUS_POLICIES / policy} is missing (network-manager / systemd packages)"
    for tool in ("ip", "nft", "ss", "curl", "busctl", "dbus-daemon", "unshare", "nsenter", "udhcpc", e2e.V2RAY):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make deps)"
    if not os.access(h.TPROXYD, os.X_OK):
        return f"{h.TPROXYD} is missing (make deps)"
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        return "this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)"
    return None


@pytest.fixture(scope="session")
def prerequisites() -> None:
    missing = _missing_prerequisite()
    if missing:
        pytest.skip(missing)


def _nm_dirs() -> str:
    """The real NetworkManager paths the sandbox mounts over: they must never change."""
    paths = ("/etc/NetworkManager", "/var/lib/NetworkManager", "/usr/lib/NetworkManager", "/run/NetworkManager")
    out = subprocess.run(["ls", "-laR", "--time-style=full-iso", *paths], capture_output=True, text=True)
    return out.stdout + out.stderr


def _snapshot() -> dict[str, str]:
    snap = e2e.main_namespace_snapshot()
    snap["hostname"] = socket.gethostname()
    snap["NetworkManager dirs"] = _nm_dirs()
    snap["/etc/resolv.conf"] = Path("/etc/resolv.conf").read_text()
    snap["our mounts"] = "\n".join(
        line
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if "tpn-" in line or "NetworkManager" in line
    )
    return snap


@pytest.fixture(scope="session", autouse=True)
def machine_unchanged(prerequisites: None) -> Iterator[None]:
    """The session must leave the main namespace (ruleset, links, addresses, routes, rules), the
    hostname, /etc/resolv.conf, NetworkManager's real directories and the mount table as they were,
    and no `tpn-` namespace behind."""
    for ns in e2e.netns_list():  # a crashed earlier run: remove its empty namespaces
        if ns.startswith("tpn-") and not e2e.run("ip", "netns", "pids", ns, check=False).stdout.split():
            e2e.delete_namespace(ns)
    before = _snapshot()
    yield
    after = _snapshot()
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert not changed, "the NetworkManager tier changed the machine:\n" + "\n".join(
        f"--- {key} before:\n{old}\n--- {key} after:\n{new}" for key, (old, new) in changed.items()
    )
    left = [ns for ns in e2e.netns_list() if ns.startswith("tpn-")]
    assert not left, f"namespaces left behind: {left}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def world(request: pytest.FixtureRequest, machine_unchanged: None) -> Iterator[h.World]:
    """A fresh world per test; everything stopped by PID and removed afterwards, even on failure
    (the logs of NetworkManager, tproxyd, the bus and v2ray are kept when the test failed)."""
    w = h.World()
    try:
        w.build()
        yield w
    finally:
        problems = w.close(keep_logs=request.node.stash.get(_FAILED, True))
    assert not problems, "\n".join(problems)


@pytest.fixture
def nm_world(world: h.World) -> h.World:
    """The world with NetworkManager running and the test connections defined (none active)."""
    world.nm.start()
    world.add_connections()
    return world
