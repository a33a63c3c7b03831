"""Fixtures of the system tier: one container per session of this package (booted with systemd as
PID 1, tproxyd installed by `make install`), and the checks that the host is left as it was:
the main namespace's ruleset, links, addresses, routes and rules; the host's device nodes
(mode, owner, ctime: a container once chmod'ed the host's /dev/null); no mount, process or
cgroup of ours left. Everything is cleaned up even when a test or the boot fails.
(Skips become failures under TPROXYD_REQUIRE_ALL=1: see tests/conftest.py.)"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support

from . import images
from .container import CGROUP_ROOTS, Container, booted, processes_in_namespaces, remove_stale_cgroups

REPO = Path(__file__).resolve().parents[2]
DEVICES = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/console",
)
# Filled by the fixtures and tests, printed at the end of the run (timings, the exposure score).
REPORT: dict[str, str] = {}


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn, namespaces, cgroups)"
    tools = ("debootstrap", "systemd-nspawn", "nsenter", "unshare", "findmnt", "ip", "nft", "make")
    if missing := support.missing_tool(*tools, hint="make deps installs debootstrap and systemd-container"):
        return missing
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    if not any(root.is_dir() for root in CGROUP_ROOTS):
        return f"none of {', '.join(map(str, CGROUP_ROOTS))} is mounted"
    return None


prerequisites = support.prerequisites_fixture(_missing_prerequisite, scope="package")


def host_snapshot() -> dict[str, str]:
    """What the container must not change on the host."""
    snap = support.network_snapshot()
    snap["/run/systemd"] = "\n".join(sorted(os.listdir("/run/systemd"))) if os.path.isdir("/run/systemd") else ""
    for dev in DEVICES:
        try:
            st = os.stat(dev)
            snap[dev] = f"mode {st.st_mode:o} owner {st.st_uid}:{st.st_gid} ctime {st.st_ctime_ns}"
        except OSError as e:
            snap[dev] = f"missing ({e.strerror})"
    return snap


def our_mounts(dirs: list[Path]) -> list[str]:
    """Mounts in the main namespace under our directories or made by this harness."""
    lines = support.run("findmnt", "-rn", "-o", "TARGET,SOURCE,FSTYPE", check=False).stdout.splitlines()
    prefixes = tuple(str(d) for d in dirs)
    return [line for line in lines if line.split(" ")[0].startswith(prefixes) or "tproxyd-systest" in line]


@pytest.fixture(scope="package")
def host_unchanged(prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The host before and after the container's whole life (this fixture outlives it)."""
    workdir = tmp_path_factory.mktemp("system")
    remove_stale_cgroups()
    before = host_snapshot()
    yield workdir
    problems = support.snapshot_changes(before, host_snapshot())
    mounts = our_mounts([workdir, images.CACHE_DIR])
    cgroups = [str(cg) for root in CGROUP_ROOTS for cg in root.glob(f"tproxyd-systest-{os.getpid()}")]
    if mounts:
        problems.append(f"mounts left on the host: {mounts}")
    if cgroups:
        problems.append(f"cgroups left: {cgroups}")
    assert not problems, "the system tier changed the host:\n" + "\n".join(problems)


@pytest.fixture(scope="package", params=images.SUITES)
def container(request: pytest.FixtureRequest, host_unchanged: Path) -> Iterator[Container]:
    """The booted container of one Debian release (each test runs on every one of
    images.SUITES), shared by the tests of this package, in file order."""
    suite: str = request.param
    workdir = host_unchanged / suite
    workdir.mkdir()
    log = workdir / "images.log"
    started = time.monotonic()
    rootfs, build_seconds = images.ensure_rootfs(REPO, log, suite)
    wheels = images.ensure_wheelhouse(REPO, log, rootfs)
    REPORT[f"{suite} rootfs"] = (
        f"{rootfs} (built now in {build_seconds:.0f} s)" if build_seconds else f"{rootfs} (from the cache)"
    )
    REPORT[f"{suite} images"] = f"{time.monotonic() - started:.1f} s (rootfs + wheelhouse)"
    box = Container(rootfs, wheels, REPO, workdir / "container", suite)
    with booted(box):
        REPORT[f"{suite} make install (chroot)"] = f"{box.timings['make install']:.1f} s"
        REPORT[f"{suite} boot to SystemState=running"] = f"{box.timings['boot']:.2f} s"
        yield box
    # booted() stopped it; nothing may remain in its namespaces.
    assert not processes_in_namespaces(box.namespaces)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("system tier")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")
