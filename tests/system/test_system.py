"""The full-system tier (docs/architecture.md, "Test tiers"): tproxyd installed by `make install`
into a debootstrapped Debian 12 (bookworm) and Debian 13 (trixie), each booted with systemd as
PID 1, with dbus, polkitd, NetworkManager and v2ray, used the way a user uses it: `busctl`, `tproxyctl`
as root and as an unprivileged user, `nmcli`, `systemctl`, `journalctl`, `systemd-analyze`,
traffic through the sandboxed core, `make uninstall` and `make purge`, all run inside the
container. What the tests observe from outside (unit and tproxyd properties) goes over the
container's system bus, from the host, without ever starting anything (NO_AUTO_START).

Every test runs once per release (the `container` fixture's parameter). The tests of one release
share one container and run in file order: activation first, purge last. Each stateful test
first makes sure of what it needs (`tproxyd_running`), so one can run alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import support
from tproxy_service.list_child import SMALL_LIST_BYTES

from .conftest import REPO, REPORT
from .container import SERVICE, SRC, BusError, Container, wait_for
from .images import die_with_parent

pytestmark = pytest.mark.root

BUS_NAME = "io.github.Tproxyd"
OBJECT = "/io/github/Tproxyd"
MANAGER = "io.github.Tproxyd.Manager1"
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")

LINK = "tpx0"  # a veth in the container, proxied in host mode
PEER = "tpx0p"  # its peer, up, left alone by NetworkManager (container.NM_UNMANAGED)
LAN_LINK = "tpx1"  # enabled by the unprivileged user; does not exist (proxied once it appears)
USER = "tpxuser"
GROUP = "netdev"  # the group polkit/50-tproxyd.rules.example grants
RULES = "/etc/polkit-1/rules.d/50-tproxyd.rules"
ACTION_TOGGLE = "io.github.Tproxyd.toggle"
NM_CONNECTION = "tpx-nm"
NM_ADDRESS = "198.51.100.2/24"  # not a reserved range: a local subnet tproxyd must bypass
NM_SUBNET = "198.51.100.0/24"
FWMARK_RULE = "fwmark 0x1 lookup 100"  # the shipped config's mark and route table
READY = 30.0  # seconds: deadline for tproxyd/the core/systemd to reach a state


# --- helpers ---------------------------------------------------------------------------------------


def busctl(box: Container, *args: str) -> subprocess.CompletedProcess[str]:
    return box.run("busctl", *args)


def prop(box: Container, name: str) -> Any:
    return box.get_property(BUS_NAME, OBJECT, MANAGER, name)


def wait_prop(box: Container, name: str, expected: Any, timeout: float = READY) -> None:
    wait_for(f"tproxyd's {name} == {expected!r}", lambda: prop(box, name) == expected, timeout)


def unit_state(box: Container, unit: str) -> str:
    return str(box.unit_property(unit, "ActiveState"))


def service_prop(box: Container, unit: str, name: str) -> Any:
    return box.unit_property(unit, name, SERVICE)


def name_has_owner(box: Container) -> bool:
    (owned,) = box.call(*DBUS, "NameHasOwner", "s", BUS_NAME)
    return bool(owned)


# tproxyd's ruleset is read with the container's own nft: the host's (Debian 12's nft 1.0.6)
# segfaults listing a table that Debian 13's libnftables 1.1 wrote.
def nft_set(box: Container, name: str) -> set[str]:
    """Elements of one of tproxyd's sets."""
    proc = box.run("nft", "-j", "list", "set", "inet", "tproxyd", name)
    elements: set[str] = set()
    for item in json.loads(proc.stdout)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "prefix" in elem:
                elements.add(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
            else:
                elements.add(str(elem))
    return elements


def our_table(box: Container) -> bool:
    return "table inet tproxyd" in box.run("nft", "list", "tables").stdout


def our_policy_rules(box: Container) -> list[str]:
    rules = box.in_netns("ip", "-4", "rule").stdout + box.in_netns("ip", "-6", "rule").stdout
    return [line for line in rules.splitlines() if FWMARK_RULE in line]


def journal_cursor(box: Container) -> str:
    out = box.run("journalctl", "--show-cursor", "-n", "0", "--no-pager").stdout
    return out.strip().rsplit("cursor: ", 1)[-1]


def journal(box: Container, unit: str, after: str | None = None) -> str:
    args = ["journalctl", "-u", unit, "--no-pager", "-o", "cat"]
    if after:
        args.append(f"--after-cursor={after}")
    return box.run(*args).stdout


# dbus-daemon logs who asked for an activation: `Activating via systemd: service name=
# 'io.github.Tproxyd' unit='tproxyd.service' requested by ':1.7' (uid=0 pid=48 comm="busctl call
# io.github.Tproxyd /io/github/Tproxyd i")` (comm: the command line's first 50 characters).
CALL_CALLER = f'comm="busctl call {BUS_NAME}'  # the README's command


def activations(box: Container) -> list[str]:
    """dbus-daemon's log lines of activations of tproxyd.service, oldest first."""
    lines = journal(box, "dbus.service").splitlines()
    return [line for line in lines if "unit='tproxyd.service' requested by" in line]


def exit_code_for(help_text: str, meaning: str) -> int:
    """An exit status as `tproxyctl --help` documents it ("  4  not authorized (polkit)")."""
    match = re.search(rf"^\s+(\d+)\s+{re.escape(meaning)}", help_text, re.MULTILINE)
    assert match, f"`tproxyctl --help` documents no exit status for {meaning!r}:\n{help_text}"
    return int(match.group(1))


def polkit_grants_toggle(box: Container, user: str) -> bool:
    """pkcheck, run as `user` about itself (a user may ask about their own processes)."""
    check = box.run("sh", "-c", 'exec pkcheck --action-id "$0" --process $$', ACTION_TOGGLE, user=user, check=False)
    return check.returncode == 0


def dispatcher_scripts() -> list[str]:
    """The NetworkManager dispatcher hooks the repository ships (nm-dispatcher/)."""
    directory = REPO / "nm-dispatcher"
    return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def installed_dispatcher_script(box: Container, name: str) -> tuple[str, int] | None:
    """(owner, mode) of a dispatcher script where NetworkManager runs it, if it is there."""
    for directory in ("/usr/lib/NetworkManager/dispatcher.d", "/etc/NetworkManager/dispatcher.d"):
        stat = box.run("stat", "-c", "%U %a", f"{directory}/{name}", check=False)
        if stat.returncode == 0:
            owner, mode = stat.stdout.split()
            return owner, int(mode, 8)
    return None


class ReapplyMonitor:
    """Records the Reapply calls that reach tproxyd, from a `busctl monitor` on the container's
    bus (the host is uid 0 there, so it may become a monitor). Ready once it saw its own probe."""

    PROBE = "/io/github/Tproxyd/systest/probe"

    def __init__(self, box: Container) -> None:
        self.proc = subprocess.Popen(
            [
                "busctl",
                f"--address={box.bus_address}",
                "monitor",
                "--json=short",
                "--match",
                f"type='method_call',interface='{MANAGER}',member='Reapply'",
                "--match",
                f"type='method_call',interface='org.freedesktop.DBus.Peer',member='Ping',path='{self.PROBE}'",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.members: list[str] = []  # appended by the reader thread, in arrival order
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

        def probed() -> bool:
            with contextlib.suppress(BusError):
                box.call("org.freedesktop.DBus", self.PROBE, "org.freedesktop.DBus.Peer", "Ping")
            return "Ping" in self.members

        wait_for("busctl monitor to see its probe", probed, 10, interval=0.2)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.members.append(json.loads(line).get("member", ""))

    def reapply_calls(self) -> int:
        return self.members.count("Reapply")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout:
            self.proc.stdout.close()


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def box(container: Container) -> Container:
    """The container with a veth pair in its network namespace (created from the host with
    nsenter into that namespace only: the main namespace's links are never touched)."""
    container.in_netns("ip", "link", "add", LINK, "type", "veth", "peer", "name", PEER)
    container.in_netns("ip", "link", "set", PEER, "up")
    return container


@pytest.fixture
def tproxyd_running(box: Container) -> Container:
    """tproxyd active with LINK proxied (what the activation test leaves behind)."""
    busctl(box, "call", BUS_NAME, OBJECT, MANAGER, "EnableLink", "ss", LINK, "host")
    wait_prop(box, "State", "active")
    return box


# --- the tests, in the order a user meets them -----------------------------------------------------------


def test_units_verify_and_hardening_score(box: Container) -> None:
    """The installed units load cleanly under the real systemd (no warning at all), and their
    sandboxing, as `systemd-analyze security` measures it, is at most 2.0 for both (systemd's
    "OK" band starts at 2.0; the core parses hostile traffic: a core exploit must not be a root
    exploit)."""
    verify = box.run(
        "systemd-analyze", "verify", "/lib/systemd/system/tproxyd.service", "/lib/systemd/system/tproxyd-core.service"
    )
    assert verify.stdout.strip() == "" and verify.stderr.strip() == "", verify.stdout + verify.stderr
    scores = {}
    for unit in ("tproxyd.service", "tproxyd-core.service"):
        out = box.run("systemd-analyze", "security", "--no-pager", unit).stdout
        match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+) (\w+)", out)
        assert match, out[-2000:]
        scores[unit] = float(match.group(1))
        REPORT[f"{box.suite} systemd-analyze security {unit}"] = f"{match.group(1)} {match.group(2)}"
    assert all(score <= 2.0 for score in scores.values()), scores


def test_tproxyd_is_ordered_before_the_network(box: Container) -> None:
    """Enabled at boot, tproxyd.service runs before network-pre.target (as firewalld does), which
    NetworkManager waits for: with failure_policy closed its table (put in place before anything
    slow, tests/e2e/test_core.py) blocks the proxied links before any of them comes up."""
    assert "network-pre.target" in box.unit_property("tproxyd.service", "Before")
    assert "network-pre.target" in box.unit_property("tproxyd.service", "Wants")
    assert "network-pre.target" not in box.unit_property("tproxyd.service", "After")
    assert "network-pre.target" in box.unit_property("NetworkManager.service", "After")


def test_busctl_call_activates_tproxyd(box: Container) -> None:
    """The README's first command, as root: the call D-Bus-activates tproxyd.service (not
    enabled, not running), the rules go into the container's netns and the core starts.

    With NetworkManager's dispatcher hook installed, NM's `up` of lo at startup has already
    activated tproxyd (the hook calls Reapply): that is checked too, then tproxyd is stopped
    (nothing else starts it: no NM event follows) so that the call meets a stopped service."""
    assert box.run("systemctl", "is-enabled", "tproxyd.service", check=False).stdout.strip() == "disabled"
    box.run("nm-online", "--wait-for-startup", "--quiet", "--timeout=30")
    if any(installed_dispatcher_script(box, script) for script in dispatcher_scripts()):
        wait_for("the NM hook to activate tproxyd at startup", lambda: activations(box), READY)
        wait_for("tproxyd.service active", lambda: unit_state(box, "tproxyd.service") == "active", READY)
        box.run("systemctl", "stop", "tproxyd.service")
    assert unit_state(box, "tproxyd.service") == "inactive"
    assert not name_has_owner(box)

    call = busctl(box, "call", BUS_NAME, OBJECT, MANAGER, "EnableLink", "ss", LINK, "host")
    assert call.stdout.strip() == ""

    assert box.run("systemctl", "is-active", "tproxyd.service").stdout.strip() == "active"
    assert unit_state(box, "tproxyd.service") == "active"
    assert name_has_owner(box)
    # The service was stopped before the call, so the latest activation dbus-daemon logged must be
    # the one our busctl asked for. (Not "after a journal cursor": dbus-daemon's syslog line can
    # land before a cursor taken just ahead of the call.)
    wait_for(
        "dbus-daemon's log of the activation by our call",
        lambda: (lines := activations(box)) and CALL_CALLER in lines[-1],
        10,
    )
    wait_prop(box, "State", "active")  # the supervised core is up and listening
    assert prop(box, "CoreState") == "active"
    assert unit_state(box, "tproxyd-core.service") == "active"
    assert prop(box, "Links") == {LINK: "host"}
    assert prop(box, "ActiveLinks") == [LINK]
    assert our_table(box)
    assert nft_set(box, "host_links") == {LINK}
    assert len(our_policy_rules(box)) == 2, our_policy_rules(box)  # IPv4 and IPv6
    status = json.loads(box.run("tproxyctl", "status", "--json").stdout)
    assert status["State"] == "active" and status["Links"] == {LINK: "host"}


def test_systemctl_status_shows_tproxyd_state(tproxyd_running: Container) -> None:
    """tproxyd's sd_notify STATUS= reaches systemd (a Type=dbus unit ignores it unless
    NotifyAccess= allows it): `systemctl status tproxyd` says the state and the active links."""
    box = tproxyd_running
    expected = f"state active, active on {LINK}"
    wait_for(
        "systemd to have tproxyd's STATUS=",
        lambda: service_prop(box, "tproxyd.service", "StatusText") == expected,
        READY,
    )
    status = box.run("systemctl", "status", "--no-pager", "tproxyd.service").stdout
    assert f'Status: "{expected}"' in status, status


# Capabilities as /proc/PID/status shows them (bit numbers from linux/capability.h).
CAPABILITY_BITS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}


def process_status(box: Container, pid: int) -> dict[str, str]:
    lines = box.run("cat", f"/proc/{pid}/status").stdout.splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def capability_mask(*names: str) -> int:
    return sum(1 << CAPABILITY_BITS[name] for name in names)


def seen_by(box: Container, pid: int, *command: str) -> str:
    """`command`'s output in the mount namespace of process `pid` (what that process sees)."""
    return box.run("nsenter", f"--target={pid}", "--mount", "--", *command).stdout


@pytest.mark.parametrize(
    ("unit", "capabilities"),
    [("tproxyd-core.service", ("CAP_NET_RAW", "CAP_NET_BIND_SERVICE")), ("tproxyd.service", ("CAP_NET_ADMIN",))],
)
def test_the_running_units_are_sandboxed(tproxyd_running: Container, unit: str, capabilities: tuple[str, ...]) -> None:
    """What a process of each unit really gets under this systemd (the score alone does not say
    it was enforced): only its capabilities, no new privileges, a seccomp filter, a /proc that
    shows it nothing else and no writable kernel tunables, no home directories; the core also
    cannot read root's secrets and has a /tmp of its own."""
    box = tproxyd_running
    pid = service_prop(box, unit, "MainPID")
    assert pid, unit
    status = process_status(box, pid)
    for kind in ("CapBnd", "CapPrm", "CapEff"):
        assert int(status[kind], 16) == capability_mask(*capabilities), (kind, status[kind])
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    proc_options = seen_by(box, pid, "findmnt", "-no", "OPTIONS", "/proc").strip().split(",")
    assert "hidepid=invisible" in proc_options and "subset=pid" in proc_options, proc_options
    assert seen_by(box, pid, "sh", "-c", "test -e /proc/sys && echo visible || echo hidden").strip() == "hidden"
    assert "ro" in seen_by(box, pid, "findmnt", "-no", "OPTIONS", "--target", "/etc").strip().split(",")
    probes = ["/home/tproxyd-systest-probe", "/root/tproxyd-systest-probe", "/tmp/tproxyd-systest-probe"]
    box.run("touch", *probes)
    try:  # ProtectHome=, PrivateTmp=: other people's files are not there at all
        assert seen_by(box, pid, "sh", "-c", 'for f; do test -e "$f" && echo "$f"; done; true', "sh", *probes) == ""
    finally:
        box.run("rm", "-f", *probes)
    if unit == "tproxyd-core.service":
        # InaccessiblePaths=: an empty node without permissions in place of root's secrets.
        assert seen_by(box, pid, "stat", "-c", "%a %s", "/etc/shadow").split() == ["0", "0"]


def test_tproxyctl_user_needs_the_group_rule(tproxyd_running: Container) -> None:
    """An unprivileged user may read but not toggle; in the group of the example rules file
    (installed as the README says) the same user may toggle, and still not reload."""
    box = tproxyd_running
    not_authorized = exit_code_for(box.run("tproxyctl", "--help").stdout, "not authorized")
    if box.run("id", USER, check=False).returncode != 0:
        box.run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER)
    links = prop(box, "Links")

    status = box.run("tproxyctl", "status", user=USER)
    assert "State:" in status.stdout and "active" in status.stdout
    denied = box.run("tproxyctl", "--no-ask-password", "enable", LAN_LINK, "--mode", "lan", user=USER, check=False)
    assert denied.returncode == not_authorized, denied
    assert "not authorized" in denied.stderr
    assert prop(box, "Links") == links

    box.run("getent", "group", GROUP)  # Debian has it; the example rule names it
    box.run("usermod", "--append", "--groups", GROUP, USER)
    box.run("cp", "/usr/share/doc/tproxyd/50-tproxyd.rules.example", RULES)
    # polkitd reloads rules.d on inotify events, asynchronously: wait until it grants the action
    # to a process of this user (pkcheck on itself), then make the real call once.
    wait_for("polkit to load the rules file", lambda: polkit_grants_toggle(box, USER), 15, interval=0.2)
    allowed = box.run("tproxyctl", "--no-ask-password", "enable", LAN_LINK, "--mode", "lan", user=USER)
    assert LAN_LINK in allowed.stdout
    assert prop(box, "Links") == {**links, LAN_LINK: "lan"}
    assert nft_set(box, "lan_links") == {LAN_LINK}
    reload = box.run("tproxyctl", "--no-ask-password", "reload", user=USER, check=False)
    assert reload.returncode == not_authorized, reload  # the rule grants toggle, not configure


@pytest.fixture
def reapply_monitor(tproxyd_running: Container) -> Iterator[ReapplyMonitor | None]:
    """Only when the repository ships a NetworkManager dispatcher script (its job: Reapply)."""
    if not dispatcher_scripts():
        yield None
        return
    monitor = ReapplyMonitor(tproxyd_running)
    try:
        yield monitor
    finally:
        monitor.close()


def test_networkmanager_connection_up_down(tproxyd_running: Container, reapply_monitor: ReapplyMonitor | None) -> None:
    """NetworkManager (the real daemon, started by the container's systemd) brings a connection
    up and down on a proxied link; tproxyd re-applies: the address NM assigns becomes a bypassed
    local subnet and is gone again after `down`. If the repository has a dispatcher script, it
    is installed where NetworkManager runs it and its Reapply reaches tproxyd on up and on down."""
    box = tproxyd_running
    assert unit_state(box, "NetworkManager.service") == "active"
    wait_for(
        f"NetworkManager to manage {LINK}",
        lambda: f"{LINK}:disconnected" in box.run("nmcli", "-t", "-f", "DEVICE,STATE", "device").stdout,
        READY,
    )
    for script in dispatcher_scripts():
        installed = installed_dispatcher_script(box, script)
        assert installed is not None, f"`make install` did not install the dispatcher script nm-dispatcher/{script}"
        owner, mode = installed
        # NetworkManager runs only root-owned scripts that group and others cannot write.
        assert owner == "root" and mode & 0o111 and not mode & 0o022, (script, owner, oct(mode))
    box.run("nmcli", "connection", "delete", NM_CONNECTION, check=False)
    connection = ["type", "ethernet", "ifname", LINK, "con-name", NM_CONNECTION, "autoconnect", "no"]
    addressing = ["ipv4.method", "manual", "ipv4.addresses", NM_ADDRESS, "ipv6.method", "disabled"]
    box.run("nmcli", "connection", "add", *connection, *addressing)
    assert NM_SUBNET not in nft_set(box, "local4")
    try:
        box.run("nmcli", "connection", "up", NM_CONNECTION)
        wait_for(f"{NM_SUBNET} in local4", lambda: NM_SUBNET in nft_set(box, "local4"), READY)
        assert prop(box, "ActiveLinks") == [LINK]
        wait_prop(box, "State", "active")
        if reapply_monitor is not None:
            wait_for("a Reapply call on `up`", lambda: reapply_monitor.reapply_calls() > 0, READY)
        seen = reapply_monitor.reapply_calls() if reapply_monitor else 0

        box.run("nmcli", "connection", "down", NM_CONNECTION)
        wait_for(f"{NM_SUBNET} gone from local4", lambda: NM_SUBNET not in nft_set(box, "local4"), READY)
        wait_prop(box, "State", "active")
        if reapply_monitor is not None:
            wait_for("a Reapply call on `down`", lambda: reapply_monitor.reapply_calls() > seen, READY)
    finally:
        box.run("nmcli", "connection", "delete", NM_CONNECTION, check=False)


def test_core_killed_is_restarted(tproxyd_running: Container) -> None:
    """`systemctl kill -s KILL tproxyd-core.service`: systemd restarts the core (Restart=on-failure),
    tproxyd goes back to `active`, and tproxyd itself was not restarted."""
    box = tproxyd_running
    wait_for("the core unit active", lambda: unit_state(box, "tproxyd-core.service") == "active", READY)
    restarts = service_prop(box, "tproxyd-core.service", "NRestarts")
    core_pid = service_prop(box, "tproxyd-core.service", "MainPID")
    daemon_pid = service_prop(box, "tproxyd.service", "MainPID")

    box.run("systemctl", "kill", "--signal=KILL", "tproxyd-core.service")

    def restarted() -> bool:
        return (
            service_prop(box, "tproxyd-core.service", "NRestarts") > restarts
            and unit_state(box, "tproxyd-core.service") == "active"
            and service_prop(box, "tproxyd-core.service", "MainPID") not in (0, core_pid)
        )

    wait_for("the core to be restarted by systemd", restarted, READY)
    wait_prop(box, "State", "active")
    assert prop(box, "CoreState") == "active"
    assert service_prop(box, "tproxyd.service", "MainPID") == daemon_pid


def test_restart_restores_choices(tproxyd_running: Container) -> None:
    """`systemctl restart tproxyd`: a new process restores the saved choices from its state
    file (the shipped config has no [links]) and puts the same rules back."""
    box = tproxyd_running
    busctl(box, "call", BUS_NAME, OBJECT, MANAGER, "EnableLink", "ss", LAN_LINK, "lan")  # idempotent
    before = {name: prop(box, name) for name in ("Links", "ActiveLinks", "Enabled")}
    assert before["Links"] == {LINK: "host", LAN_LINK: "lan"}
    pid = service_prop(box, "tproxyd.service", "MainPID")
    cursor = journal_cursor(box)

    box.run("systemctl", "restart", "tproxyd.service")

    wait_for(
        "a new tproxyd process",
        lambda: (
            service_prop(box, "tproxyd.service", "MainPID") not in (0, pid)
            and unit_state(box, "tproxyd.service") == "active"
        ),
        READY,
    )
    wait_prop(box, "State", "active")
    assert {name: prop(box, name) for name in before} == before
    assert prop(box, "CoreState") == "active"
    assert nft_set(box, "host_links") == {LINK} and nft_set(box, "lan_links") == {LAN_LINK}
    assert "restored saved choices from /var/lib/tproxyd/state.json" in journal(box, "tproxyd.service", cursor)


WIRE = "tpxw"  # a veth from the container to an upstream namespace: proxied in host mode
WIRE_PEER = "tpxwp"  # its peer, in the upstream namespace
WIRE_ADDRESS = ("192.0.2.2/24", "192.0.2.1/24")  # container side, upstream side
SERVER = ("203.0.113.1", 8080)  # not a reserved range nor a connected subnet: proxied
CORE_CONFIG = "/etc/tproxyd/core.json"
ACCESS_LOG = "/var/log/tproxyd/access.log"  # the core unit's LogsDirectory=
# The admin's core config: v2ray's default outbound (freedom, direct), with an access log.
USER_CORE_CONFIG = {
    "log": {"loglevel": "info", "access": ACCESS_LOG},
    "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
}


@dataclass
class Upstream:
    holder: subprocess.Popen[bytes]  # `unshare --net sleep`: owns the upstream network namespace
    server: subprocess.Popen[bytes]  # an HTTP server on SERVER in there
    body: str  # what the server answers for /probe


def in_upstream(upstream_pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return support.run("nsenter", f"--target={upstream_pid}", "--net", "--", *args)


@pytest.fixture
def upstream(box: Container, tmp_path: Path) -> Iterator[Upstream]:
    """An "Internet" beyond the container: an anonymous network namespace (it dies with its
    holder process, nothing is named on the host) joined to the container by the WIRE veth,
    with an HTTP server on SERVER. The container routes SERVER's subnet over WIRE."""
    holder = subprocess.Popen(
        ["unshare", "--net", "--", "sleep", "infinity"], stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
    )
    server: subprocess.Popen[bytes] | None = None
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        wait_for("the upstream namespace", lambda: os.stat(f"/proc/{holder.pid}/ns/net").st_ino != own, 10)
        box.in_netns("ip", "link", "add", WIRE, "type", "veth", "peer", "name", WIRE_PEER, "netns", str(holder.pid))
        in_upstream(holder.pid, "ip", "link", "set", "lo", "up")
        in_upstream(holder.pid, "ip", "address", "add", WIRE_ADDRESS[1], "dev", WIRE_PEER)
        in_upstream(holder.pid, "ip", "link", "set", WIRE_PEER, "up")
        in_upstream(holder.pid, "ip", "address", "add", f"{SERVER[0]}/32", "dev", "lo")
        box.in_netns("ip", "address", "add", WIRE_ADDRESS[0], "dev", WIRE)
        box.in_netns("ip", "link", "set", WIRE, "up")
        gateway = WIRE_ADDRESS[1].split("/")[0]
        box.in_netns("ip", "route", "add", f"{SERVER[0]}/32", "via", gateway, "dev", WIRE)
        body = f"tproxyd system tier {os.getpid()}"
        (tmp_path / "probe").write_text(body)
        server = subprocess.Popen(
            ["nsenter", f"--target={holder.pid}", "--net", "--", sys.executable, "-m", "http.server",
             "--bind", SERVER[0], "--directory", str(tmp_path), str(SERVER[1])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )  # fmt: skip
        listening = ("ss", "-Hltn", f"sport = :{SERVER[1]}")
        wait_for("the upstream HTTP server", lambda: in_upstream(holder.pid, *listening).stdout.strip(), 10)
        yield Upstream(holder, server, body)
    finally:
        for proc in (server, holder):
            if proc is not None:
                proc.kill()
                proc.wait()
        box.in_netns("ip", "link", "delete", WIRE, check=False)  # gone with the namespace already


def fetch_from_container(box: Container) -> str:
    url = f"http://{SERVER[0]}:{SERVER[1]}/probe"
    code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())"
    return box.run("python3", "-c", code, url).stdout.strip()


def test_traffic_goes_through_the_sandboxed_core(tproxyd_running: Container, upstream: Upstream) -> None:
    """The container's own connection to the upstream server, leaving over a link proxied in
    host mode, is carried by the core running in its sandbox (its access log, in the logs
    directory the unit allows, names the flow), and the answer comes back."""
    box = tproxyd_running
    box.run("cp", f"{SRC}/etc/config.toml", "/etc/tproxyd/config.toml")
    box.run("sh", "-c", f"cat > {CORE_CONFIG}", input=json.dumps(USER_CORE_CONFIG))
    box.run("sed", "-i", f's|^# config = "{CORE_CONFIG}"|config = "{CORE_CONFIG}"|', "/etc/tproxyd/config.toml")
    try:
        box.run("tproxyctl", "reload")
        busctl(box, "call", BUS_NAME, OBJECT, MANAGER, "EnableLink", "ss", WIRE, "host")
        wait_prop(box, "State", "active")
        wait_for(f"{WIRE} active", lambda: WIRE in prop(box, "ActiveLinks"), READY)

        assert fetch_from_container(box) == upstream.body

        flow = f"accepted tcp:{SERVER[0]}:{SERVER[1]}"
        wait_for("the flow in the core's access log", lambda: flow in box.run("cat", ACCESS_LOG).stdout, READY)
    finally:
        box.run("cp", f"{SRC}/etc/config.toml", "/etc/tproxyd/config.toml")
        box.run("rm", "-f", CORE_CONFIG)
        busctl(box, "call", BUS_NAME, OBJECT, MANAGER, "DisableLink", "s", WIRE)
        box.run("tproxyctl", "reload")
        wait_prop(box, "State", "active")


LIST_FILE = "/etc/tproxyd/direct.txt"


def table_handles(box: Container) -> list[str]:
    """The handles of the table's sets, chains and rules: a rebuild gives them new numbers."""
    return re.findall(r"# handle (\d+)", box.run("nft", "-a", "list", "table", "inet", "tproxyd").stdout)


def _list_of_24s(count: int, start: int) -> list[str]:
    """`count` /24s from 11.1.0.0 on (not reserved, and not next to 10.0.0.0/8, which would merge
    with it), every other one, the first at index `start`."""
    return [f"11.{(i >> 8) + 1}.{i & 255}.0/24" for i in range(start * 2, (start + count) * 2, 2)]


def test_a_large_changed_list_reloads_through_the_child_parser(tproxyd_running: Container) -> None:
    """A list over 256 KiB is parsed by a child process of tproxyd at a Reload: under the shipped
    sandbox (its system call filter, capability set, ProtectProc) the Reload applies it, a 1%
    update is applied as element changes, and the parsed list is kept in state_dir/lists."""
    box = tproxyd_running
    listed = _list_of_24s(20_000, 0)
    box.run("sh", "-c", f"cat > {LIST_FILE}", input="\n".join(listed) + "\n")
    assert int(box.run("stat", "-c", "%s", LIST_FILE).stdout) > SMALL_LIST_BYTES  # parsed by the child
    box.run("sed", "-i", f's|^# files = \\["{LIST_FILE}"\\].*|files = ["{LIST_FILE}"]|', "/etc/tproxyd/config.toml")
    assert f'files = ["{LIST_FILE}"]' in box.run("cat", "/etc/tproxyd/config.toml").stdout
    cursor = journal_cursor(box)
    try:
        box.run("tproxyctl", "reload")
        elements = nft_set(box, "bypass4")
        assert listed[0] in elements and listed[-1] in elements
        handles = table_handles(box)
        updated = listed[200:] + _list_of_24s(200, 30_000)  # 1% replaced
        box.run("sh", "-c", f"cat > {LIST_FILE}", input="\n".join(updated) + "\n")
        assert int(box.run("stat", "-c", "%s", LIST_FILE).stdout) > SMALL_LIST_BYTES
        box.run("tproxyctl", "reload")
        elements = nft_set(box, "bypass4")
        assert updated[-1] in elements and listed[0] not in elements
        assert table_handles(box) == handles, "the table was rebuilt for a 1% change of the list"
        assert len(box.run("ls", "/var/lib/tproxyd/lists").stdout.split()) == 1
        text = journal(box, "tproxyd.service", cursor)
        assert "Traceback" not in text and "parsing CIDR list file" not in text, text
    finally:
        box.run("cp", f"{SRC}/etc/config.toml", "/etc/tproxyd/config.toml")
        box.run("tproxyctl", "reload")
        box.run("rm", "-f", LIST_FILE)
    assert box.run("ls", "/var/lib/tproxyd/lists").stdout.split() == []  # no list named: none kept


def test_journal_is_readable(tproxyd_running: Container) -> None:
    """`journalctl -u tproxyd` shows the daemon's own log lines (stderr -> journald)."""
    text = journal(tproxyd_running, "tproxyd.service")
    assert f"owning {BUS_NAME} on the system bus" in text
    assert "tproxyd ready: state=" in text
    assert "Traceback" not in text


def test_no_drift_reported_for_our_own_changes(tproxyd_running: Container) -> None:
    """Nobody but tproxyd touched its table in this container, so it must never have logged that
    its table was changed from outside. (nf_tables reports the committing task's PID as the
    initial PID namespace sees it: inside a container, tproxyd once took each of its own commits
    for an outside change and rebuilt the table, ~20 times per activation.)"""
    text = journal(tproxyd_running, "tproxyd.service")
    assert "changed from outside" not in text, [line for line in text.splitlines() if "changed from outside" in line]


STATE_FILE = "/var/lib/tproxyd/state.json"


def installed_files(box: Container) -> list[str]:
    """The Makefile's INSTALLED_FILES, as the tree in the container lists them."""
    print_files = "--eval=tproxyd-systest-files: ; @echo $(INSTALLED_FILES)"
    out = box.run("make", "-s", "--no-print-directory", "-C", SRC, print_files, "tproxyd-systest-files").stdout
    return out.split()


def existing(box: Container, paths: list[str]) -> list[str]:
    script = 'for f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done'
    return box.run("sh", "-c", script, "sh", *paths).stdout.split()


def files_named_tproxyd(box: Container) -> list[str]:
    """Anything with our name on the container's disk, besides what is not ours to remove: the
    source tree, the journal and the admin's polkit rules file."""
    not_ours = ["(", "-path", SRC, "-o", "-path", "/var/log/journal", "-o", "-path", RULES, ")", "-prune"]
    return box.run("find", "/", "-xdev", *not_ours, "-o", "-name", "*tproxyd*", "-print").stdout.split()


def test_uninstall_removes_the_program_and_keeps_the_choices(tproxyd_running: Container) -> None:
    """`make uninstall` (in the booted system, from the same tree) while tproxyd runs, as Debian's
    `apt remove`: no file `make install` put down, no unit, no process, no bus name, no table,
    rule or route of ours; the saved choices stay as they were, and so do the core's file logs."""
    box = tproxyd_running
    installed = installed_files(box)
    assert "/lib/systemd/system/tproxyd.service" in installed and "/usr/bin/tproxyctl" in installed
    assert our_table(box) and our_policy_rules(box)
    saved = box.run("cat", STATE_FILE).stdout
    assert LINK in json.loads(saved)["links"], saved
    logs = box.run("ls", "/var/log/tproxyd", check=False).stdout.split()  # the traffic test's access log

    box.run("make", "-C", SRC, "uninstall", timeout=120)

    assert existing(box, [*installed, "/usr/lib/tproxyd", "/etc/tproxyd", "/run/tproxyd"]) == []
    for unit in ("tproxyd.service", "tproxyd-core.service"):
        assert box.unit_property(unit, "LoadState") == "not-found", unit
        assert unit_state(box, unit) == "inactive", unit
    unit_files = box.run("systemctl", "list-unit-files", "--no-legend", "tproxyd*", check=False)
    assert unit_files.stdout.strip() == "", unit_files.stdout  # (rc 1: nothing matched)
    processes = box.run("ps", "-eo", "comm=,args=").stdout
    assert not [p for p in processes.splitlines() if "tproxyd" in p or p.startswith("v2ray")], processes
    assert not name_has_owner(box)
    assert not our_table(box)
    assert our_policy_rules(box) == []
    for family in ("-4", "-6"):
        assert box.in_netns("ip", family, "route", "show", "table", "100").stdout.strip() == ""
    assert box.run("cat", STATE_FILE).stdout == saved
    found = files_named_tproxyd(box)
    REPORT[f"{box.suite} kept by make uninstall"] = " ".join(found)
    assert set(found) == {"/var/lib/tproxyd", *(["/var/log/tproxyd"] if logs else [])}, found
    assert box.run("ls", "/var/log/tproxyd", check=False).stdout.split() == logs


def test_purge_leaves_nothing(box: Container) -> None:
    """`make purge` after the uninstall, as Debian's `apt purge`: the saved choices and the file
    logs go too, and nothing with our name is left."""
    box.run("make", "-C", SRC, "purge", timeout=120)
    assert existing(box, [*installed_files(box), "/usr/lib/tproxyd", "/etc/tproxyd", "/var/lib/tproxyd"]) == []
    found = files_named_tproxyd(box)
    REPORT[f"{box.suite} left after make purge"] = " ".join(found) or "nothing"
    assert found == [], found
