"""nm-dispatcher/90-tproxyd: run by the real nm-dispatcher it calls Reapply (seen on the bus);
with tproxyd stopped or busy it returns at once with 0; with tproxyd installed but not running
its call D-Bus-activates it. (Its handling of hostile values: tests/unit/test_dispatcher_script.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tproxy_service.bus import names

from . import harness as h
from .test_policies import wait_sets

pytestmark = pytest.mark.root

CALL_TIMEOUT = 2  # s: the script's busctl --timeout


def is_reapply(m: dict[str, Any]) -> bool:
    return (
        m.get("type") == "method_call"
        and m.get("destination") == names.BUS_NAME
        and m.get("interface") == names.MANAGER_IFACE
        and m.get("member") == "Reapply"
    )


def answered(monitor: h.BusMonitor, call: dict[str, Any]) -> dict[str, Any] | None:
    """The reply (return or error) the bus carried back to `call`."""
    replies = monitor.find(
        lambda m: (
            m.get("type") in ("method_return", "error")
            and m.get("reply_cookie") == call.get("cookie")
            and m.get("destination") == call.get("sender")
        )
    )
    return replies[0] if replies else None


@pytest.fixture
def monitor(world: h.World) -> Iterator[h.BusMonitor]:
    mon = h.BusMonitor(world.bus, world.workdir / "busctl-monitor.log")
    # busctl prints nothing until it is a monitor; a signal we cause shows it is listening.
    try:
        h.wait_until(lambda: _poke_and_seen(world, mon), 10, "busctl monitor to see the bus")
        yield mon
    finally:
        mon.stop()


def _poke_and_seen(world: h.World, mon: h.BusMonitor) -> bool:
    world.bus.has_owner("tpn.poke")
    return bool(mon.find(lambda m: m.get("member") == "NameHasOwner"))


def test_nm_dispatcher_runs_the_script_which_calls_reapply(nm_world: h.World, monitor: h.BusMonitor) -> None:
    w = nm_world
    w.tproxyd.start()
    assert not monitor.find(is_reapply)
    w.nm.up(h.CAFE)  # nm-dispatcher runs 90-tproxyd with "tpnv0 up" (and connectivity-change)
    wait_sets(w, {h.CAFE_LINK}, set(), "the café link proxied")
    call = h.wait_until(lambda: (calls := monitor.find(is_reapply)) and calls[0], 10, "a Reapply call on the bus")
    reply = h.wait_until(lambda: answered(monitor, call), 10, "tproxyd's answer to Reapply")
    assert reply["type"] == "method_return", reply
    # The caller was the script's busctl, started by nm-dispatcher inside the sandbox.
    assert any(cmd.startswith(str(h.NM_DISPATCHER)) for _pid, cmd in w.sandbox.processes())
    assert "Traceback" not in w.tproxyd.log_text()


@dataclass(frozen=True)
class ScriptRun:
    rc: int
    output: str
    session: int  # the script led its own session: what it left in the background is in it


def run_script(w: h.World, *args: str) -> ScriptRun:
    """The shipped script, as nm-dispatcher runs it (ACTION in $2), against the sandbox's bus."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": w.bus.address}
    proc = subprocess.Popen(
        [str(h.DISPATCHER_SCRIPT), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output, _ = proc.communicate(timeout=10)
    return ScriptRun(proc.returncode, output, proc.pid)


BUSY_DAEMON = """
import asyncio, sys
from dbus_fast import NameFlag
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    def swallow(msg):  # takes every call to tproxyd's object and never answers: a hung daemon
        if msg.path == "/io/github/Tproxyd":
            print("call", msg.member, flush=True)
            return True
        return None

    bus.add_message_handler(swallow)
    await bus.request_name("io.github.Tproxyd", NameFlag.DO_NOT_QUEUE)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_script_returns_at_once_with_tproxyd_stopped_or_busy(world: h.World) -> None:
    w = world
    # Stopped (and not installed for activation): the call fails at once in the background.
    script = run_script(w, h.CAFE_LINK, "up")
    assert (script.rc, script.output) == (0, ""), script
    h.wait_until(lambda: not h.session_alive(script.session), 5, "the background call to end")

    # Busy: something owns the name but never answers. The script still returns at once (its
    # background call is still waiting when it has returned: it did not wait for it); the call
    # gives up after its timeout. How fast it returns is measured in bench/, not asserted here.
    busy = subprocess.Popen([sys.executable, "-c", BUSY_DAEMON, w.bus.address], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert busy.stdout is not None and busy.stdout.readline().strip() == "ready"
        script = run_script(w, h.CAFE_LINK, "dhcp4-change")
        assert (script.rc, script.output) == (0, ""), script
        assert h.session_alive(script.session), "the script returned before its call to the busy daemon ended"
        assert busy.stdout.readline().strip() == "call Reapply"
        h.wait_until(lambda: not h.session_alive(script.session), CALL_TIMEOUT + 3, "the background call to time out")
    finally:
        busy.send_signal(signal.SIGTERM)
        busy.wait(10)


def test_script_activates_tproxyd_when_installed_but_not_running(world: h.World, monitor: h.BusMonitor) -> None:
    w = world
    w.tproxyd.write_config()
    # Installed: an activation file (as dbus/io.github.Tproxyd.service, pointed at our config).
    # The bus runs inside the sandbox, so the activated tproxyd does too.
    (w.sandbox.services_dir / "io.github.Tproxyd.service").write_text(
        f"[D-BUS Service]\nName={names.BUS_NAME}\nExec={h.TPROXYD} --config {w.tproxyd.config}\nUser=root\n"
    )
    assert not w.bus.has_owner(names.BUS_NAME)
    script = run_script(w, h.CAFE_LINK, "up")
    assert script.rc == 0, script
    h.wait_until(lambda: w.bus.has_owner(names.BUS_NAME), 20, "tproxyd D-Bus-activated by the script's call")
    h.wait_until(lambda: w.bus.properties()["State"] != "starting", 20, "the activated tproxyd to be ready")
    assert monitor.find(is_reapply)
    activated = [pid for pid, cmd in w.sandbox.processes() if f"--config {w.tproxyd.config}" in cmd]
    assert len(activated) == 1, w.sandbox.processes()
    os.kill(activated[0], signal.SIGTERM)  # a process this test started (through the bus)
    h.wait_until(lambda: not w.bus.has_owner(names.BUS_NAME), 15, "the activated tproxyd to stop")
    h.wait_until(lambda: h.gone(activated[0]), 10, "the activated tproxyd to exit")
