"""Fixtures for the end-to-end tier: the namespace lab, tproxyd processes, and the checks that
nothing outside our namespaces, and nothing of other people's inside them, changes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import support
from tests.integration.harness import PrivateBus

from . import harness as h


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "flushes_foreign_tables: the test runs `nft flush ruleset` in the gateway namespace, so the "
        "foreign tables are expected to be gone afterwards (tproxyd never recreates them)",
    )


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    if missing := support.missing_tool("ip", "nft", "ss", "curl", "sysctl", "dnsmasq", h.V2RAY):
        return missing
    if not os.access(h.TPROXYD, os.X_OK):
        return f"{h.TPROXYD} is missing (make deps)"
    probe = subprocess.run(["ip", "netns", "add", "tpe-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "tpe-probe"], capture_output=True)
    return None


prerequisites = support.prerequisites_fixture(_missing_prerequisite)


@pytest.fixture(scope="session", autouse=True)
def main_namespace_unchanged(prerequisites: None) -> Iterator[None]:
    """The whole session must leave the main namespace (ruleset, links, addresses, routes, rules)
    and /dev/null as they were, and no `tpe-` namespace behind."""
    before = support.main_namespace_snapshot()
    yield
    changed = support.snapshot_changes(before, support.main_namespace_snapshot())
    assert not changed, "the test session changed the main namespace:\n" + "\n".join(changed)
    left = [ns for ns in support.netns_list() if ns.startswith("tpe-")]
    assert not left, f"namespaces left behind: {left}"


def _remove_stale_namespaces() -> None:
    """A crashed earlier run may have left `tpe-` namespaces; reuse would give confusing results."""
    for ns in h.netns_list():
        if not ns.startswith("tpe-"):
            continue
        pids = h.run("ip", "netns", "pids", ns, check=False).stdout.split()
        if pids:
            pytest.fail(f"stale namespace {ns} still has processes {pids}; stop them and delete it")
        h.delete_namespace(ns)


# Package scope: the namespaces are gone before other test tiers run in the same session.
@pytest.fixture(scope="package")
def lab(main_namespace_unchanged: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[h.Lab]:
    """Namespaces, links, addresses, servers, v2ray and the leak probe; torn down even on failure."""
    _remove_stale_namespaces()
    workdir = tmp_path_factory.mktemp("e2e")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        h.build_topology()
        processes.append(h.start_peer_server(h.SRV, workdir / "srv.log", (h.HTTP_PORT,), (h.UDP_PORT,)))
        # The router also answers: as a directly connected host and as a resolver on port 53.
        processes.append(
            h.start_peer_server(h.UP, workdir / "router.log", (h.HTTP_PORT, h.DNS_PORT), (h.UDP_PORT, h.DNS_PORT))
        )
        v2ray, access = h.start_v2ray(workdir)
        processes.append(v2ray)
        leaks = h.LeakProbe()
        h.install_foreign_tables(h.GW)
        yield h.Lab(workdir, access, leaks, h.Proofs(access, leaks))
    finally:
        for proc in reversed(processes):
            h.stop_process(proc)
        for ns in (h.LATE_CLI, *h.NAMESPACES):
            h.delete_namespace(ns)


@pytest.fixture(autouse=True)
def foreign_tables_untouched(request: pytest.FixtureRequest, lab: h.Lab) -> Iterator[None]:
    """Every test: a Docker-like `ip nat` table and an admin's `inet filter` table live in the
    gateway namespace, and must read the same afterwards (counter values aside)."""
    if any(v is None for v in h.foreign_listing(h.GW).values()):
        h.install_foreign_tables(h.GW)  # an earlier test flushed the ruleset on purpose
    before = h.foreign_listing(h.GW)
    yield
    if request.node.get_closest_marker("flushes_foreign_tables"):
        return
    assert h.foreign_listing(h.GW) == before, "a foreign nftables table in the gateway namespace changed"


StartDaemon = Callable[..., h.Tproxyd]


def _stop_daemon(daemon: h.Tproxyd) -> str | None:
    """Stop a test's daemon and clean the gateway namespace; returns a problem to report, if any."""
    problem = None
    try:
        if daemon.running:
            rc = daemon.terminate()
            if rc != 0:
                problem = f"tproxyd exited with {rc} on SIGTERM"
    except subprocess.TimeoutExpired:
        problem = "tproxyd did not exit within 15s of SIGTERM"
    finally:
        if daemon.running:  # whatever went wrong above, it must not outlive its namespace
            daemon.kill()
        h.remove_our_kernel_state(h.GW)
    return None if problem is None else f"{problem}; log:\n{daemon.log_text()[-3000:]}"


@pytest.fixture
def start_tproxyd(lab: h.Lab, tmp_path: Path) -> Iterator[StartDaemon]:
    """Start tproxyd (ready: its log line and its kernel state) with a config; every daemon a test
    started is stopped afterwards, and the gateway namespace is cleaned even after a crash."""
    started: list[h.Tproxyd] = []

    def start(config: h.TproxydConfig | None = None, wait: bool = True, bus_address: str | None = None) -> h.Tproxyd:
        config = config or h.TproxydConfig(tmp_path / "conf")
        daemon = h.Tproxyd(config, tmp_path / f"tproxyd-{len(started) + 1}.log", bus_address)
        started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    yield start
    problems = [p for p in (_stop_daemon(d) for d in started) if p]
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def shared_tproxyd(lab: h.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[h.Tproxyd]:
    """One daemon with the default config for a module of read-only traffic tests."""
    workdir = tmp_path_factory.mktemp("shared-tproxyd")
    daemon = h.Tproxyd(h.TproxydConfig(workdir / "conf"), workdir / "tproxyd.log")
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        problem = _stop_daemon(daemon)
    assert problem is None, problem


@pytest.fixture
def late_client(lab: h.Lab) -> Iterator[Callable[[], None]]:
    """Creates the late client LAN (and the gateway's `tpe-gl`) when called; removed afterwards."""
    yield h.new_late_client
    h.delete_namespace(h.LATE_CLI)


@pytest.fixture(scope="module")
def status_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBus]:
    """A private system bus with tproxyd's shipped policy, for tests that read what tproxyd
    reports (State, LastError, tproxyctl status) where the lab's neighbours break something."""
    bus = PrivateBus(tmp_path_factory.mktemp("status-bus"))
    try:
        bus.start()
        yield bus
    finally:
        bus.stop()
