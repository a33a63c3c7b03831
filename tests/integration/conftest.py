"""Fixtures for the integration tier: one private bus + real polkitd per session, a fresh network
namespace and tproxyd per test, and a check that the session left the machine as it found it.
(Skips become failures under TPROXYD_REQUIRE_ALL=1: see tests/conftest.py.)"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import support

from . import harness as h


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, polkitd, setpriv)"
    if missing := support.missing_tool("dbus-daemon", "busctl", "setpriv", "unshare", "nft", "ip"):
        return missing
    if not h.POLKITD.exists():
        return f"{h.POLKITD} is missing (polkitd package; make deps)"
    if not h.DEBIAN_POLKIT_BUS_POLICY.exists():
        return f"{h.DEBIAN_POLKIT_BUS_POLICY} is missing (polkitd package)"
    for user in (h.PLAIN, h.GRANTED):
        try:
            entry = pwd.getpwnam(user.name)
        except KeyError:
            return f"the test user {user.name!r} does not exist"
        if (entry.pw_uid, entry.pw_gid) != (user.uid, user.gid):
            return f"the test user {user.name!r} is not uid/gid {user.uid}/{user.gid} here"
    probe = h.as_user(h.PLAIN, [str(h.PYTHON), "-c", "import tproxy_service, dbus_fast"], {"PATH": "/usr/bin:/bin"})
    if probe.returncode != 0:
        return f"the venv's python is not usable by {h.PLAIN.name} (make it from /usr/bin/python3): {probe.stderr}"
    return None


prerequisites = support.prerequisites_fixture(_missing_prerequisite)


def _snapshot() -> dict[str, str]:
    """The main namespace, /dev/null, polkit's real directories and the mounts that name polkit."""
    snap = support.main_namespace_snapshot()
    polkit_dirs = ("/etc/polkit-1/rules.d", "/usr/share/polkit-1/actions")
    snap["polkit dirs"] = support.run("ls", "-la", *polkit_dirs, check=False).stdout
    snap["mounts"] = "\n".join(line for line in Path("/proc/self/mounts").read_text().splitlines() if "polkit" in line)
    return snap


@pytest.fixture(scope="session", autouse=True)
def machine_unchanged(prerequisites: None) -> Iterator[None]:
    """The session must leave the main namespace, /dev/null, polkit's real directories and the
    mount table as they were, and no namespace of ours behind."""
    before = _snapshot()
    ours_before = {ns for ns in support.netns_list() if ns.startswith("tpd-")}
    yield
    changed = support.snapshot_changes(before, _snapshot())
    assert not changed, "the integration session changed the machine:\n" + "\n".join(changed)
    left = {ns for ns in support.netns_list() if ns.startswith("tpd-")} - ours_before
    assert not left, f"namespaces left behind: {sorted(left)}"


@pytest.fixture(scope="session")
def stack(prerequisites: None) -> Iterator[h.Stack]:
    with h.stack() as s:
        yield s


@pytest.fixture
def bus(stack: h.Stack) -> h.PrivateBus:
    return stack.bus


MakeDaemon = Callable[..., h.Tproxyd]


@pytest.fixture
def make_daemon(stack: h.Stack) -> Iterator[MakeDaemon]:
    """make_daemon(links={...}, extra="...", start=True): tproxyd in a fresh namespace."""
    contexts = []

    def make(links: dict[str, str] | None = None, extra: str = "", start: bool = True) -> h.Tproxyd:
        ctx = h.daemon_in_netns(stack.bus, links, extra)
        daemon = ctx.__enter__()
        contexts.append(ctx)
        if start:
            daemon.start()
        return daemon

    yield make
    for ctx in reversed(contexts):
        ctx.__exit__(None, None, None)


@pytest.fixture
def daemon(make_daemon: MakeDaemon) -> h.Tproxyd:
    """Running tproxyd with `tpdv0 = "host"` as its only [links] default."""
    return make_daemon(links={h.LINK_A: "host"})
