"""tproxyctl as root and as a plain user: what it prints, and its exit codes."""

from __future__ import annotations

import json
import subprocess

import pytest

from tproxy_service import __version__, cli
from tproxy_service.bus.spec import PROPERTIES

from . import harness as h

pytestmark = pytest.mark.root


def ctl(
    user: h.User, bus: h.PrivateBus, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return h.as_user(user, [str(h.TPROXYCTL), *args], {**bus.env(), **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tproxyctl: "), proc.stderr
    return lines[0]


def test_status_as_root_and_as_plain_user(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    assert bus.call("EnableLink", "ss", ["tpd-later", ""]).error is None
    core = bus.properties()["CoreState"]
    for user in (h.ROOT, h.PLAIN):
        proc = ctl(user, bus, "status")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "State:          active",
            "Enabled:        yes",
            f"Core:           {core}",
            "Failure policy: open",
            "Last error:     -",
            f"Version:        {__version__}",
            "",
            "LINK       MODE  ACTIVE",
            "tpd-later  auto  no",
            "tpdv0      host  yes",
        ]
        as_json = ctl(user, bus, "status", "--json")
        assert as_json.returncode == 0
        assert json.loads(as_json.stdout) == bus.properties()


def test_changes_as_root(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    steps = [
        (["enable", h.LINK_B, "--mode", "lan"], f"{h.LINK_B}: proxied (lan)"),
        (["enable", "tpd-later"], "tpd-later: auto; proxied once the link appears"),
        (["disable", h.LINK_A], f"{h.LINK_A}: not proxied"),
        (["off"], "tproxyd is off"),
        (
            ["enable", h.LINK_A, "--mode", "both"],
            f"{h.LINK_A}: both; tproxyd is off, so nothing is proxied (tproxyctl on)",
        ),
        (["on"], "tproxyd is on"),
        (["reapply"], ""),
        (["reload"], "config reloaded"),
    ]
    for args, output in steps:
        proc = ctl(h.ROOT, bus, *args)
        assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, output, ""), args
    props = bus.properties()
    assert props["Links"] == {h.LINK_A: "both", h.LINK_B: "lan", "tpd-later": ""}
    assert props["ActiveLinks"] == [h.LINK_A, h.LINK_B]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["enable", "eth/0"], cli.EXIT_INVALID, "tproxyctl: interface name 'eth/0' contains a character"),
        (["enable", h.LINK_B, "--mode", "sideways"], cli.EXIT_INVALID, "tproxyctl: no such mode 'sideways'"),
        (["disable", "a" * 16], cli.EXIT_INVALID, "tproxyctl: interface name"),
    ],
)
def test_invalid_arguments(daemon: h.Tproxyd, bus: h.PrivateBus, args: list[str], code: int, message: str) -> None:
    proc = ctl(h.ROOT, bus, *args)
    assert proc.returncode == code
    assert one_line_error(proc).startswith(message)


@pytest.mark.parametrize(
    ("args", "action"),
    [(["enable", h.LINK_B], "toggle"), (["disable", h.LINK_A], "toggle"), (["on"], "toggle"), (["off"], "toggle"),
     (["reapply"], "toggle"), (["reload"], "configure")],
)  # fmt: skip
def test_plain_user_is_refused(daemon: h.Tproxyd, bus: h.PrivateBus, args: list[str], action: str) -> None:
    before = bus.properties()
    proc = ctl(h.PLAIN, bus, *args)
    assert proc.returncode == cli.EXIT_DENIED
    assert one_line_error(proc).startswith(f"tproxyctl: not authorized to {action} tproxyd (polkit)")
    assert bus.properties() == before


def test_granted_user_may_toggle(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    proc = ctl(h.GRANTED, bus, "enable", h.LINK_B, "--mode", "host")
    assert proc.returncode == 0, proc.stderr
    assert bus.properties()["ActiveLinks"] == [h.LINK_A, h.LINK_B]


def test_reload_with_a_bad_config(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    daemon.config.write_text(daemon.config.read_text() + "\n[tproxy]\nport = 0\n")
    proc = ctl(h.ROOT, bus, "reload")
    assert proc.returncode == cli.EXIT_CONFIG
    line = one_line_error(proc)
    assert "tproxy.port" in line and "config.toml:" in line
    assert bus.properties()["State"] == "active"


def test_unreachable(stack: h.Stack, bus: h.PrivateBus) -> None:
    not_running = ctl(h.PLAIN, bus, "status")  # the bus is there, tproxyd is not
    assert not_running.returncode == cli.EXIT_UNREACHABLE
    assert (
        one_line_error(not_running) == "tproxyctl: tproxyd is not running (io.github.Tproxyd is not on the system bus)"
    )
    no_bus = ctl(h.PLAIN, bus, "on", env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={stack.workdir}/nope"})
    assert no_bus.returncode == cli.EXIT_UNREACHABLE
    assert one_line_error(no_bus).startswith("tproxyctl: cannot connect to the system bus")


def test_usage_and_help(bus: h.PrivateBus) -> None:
    assert ctl(h.PLAIN, bus, "frobnicate").returncode == cli.EXIT_USAGE
    assert ctl(h.PLAIN, bus, "enable").returncode == cli.EXIT_USAGE
    helped = ctl(h.PLAIN, bus, "--help")
    assert helped.returncode == 0
    for code in range(8):
        assert f"\n  {code}  " in helped.stdout
    assert "io.github.Tproxyd.toggle" in helped.stdout


def test_monitor_prints_changes_for_a_plain_user(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    proc = h.user_popen(h.PLAIN, [str(h.TPROXYCTL), "monitor"], bus.env())
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the initial values come first, one line each
        assert first.split(" ", 1)[1].startswith("ActiveLinks: tpdv0"), first
        assert bus.call("SetEnabled", "b", [False]).error is None
        initial = len(PROPERTIES) - 1  # one line each, the first one read above
        lines = [proc.stdout.readline() for _ in range(initial + 3)]
        changes = [line.split(" ", 1)[1].strip() for line in lines[initial:]]
        assert sorted(changes) == ["ActiveLinks: (none)", "Enabled: no", "State: off"], lines
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
