"""tproxyd and the bus over its lifetime: ready only once it owns its name and finished its first
reconcile (sd_notify), one instance per bus, still working with no bus at all, and root-only
when polkitd is missing. The shipped bus policy lets only root own the name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy_service.bus import names

from . import harness as h
from .calls import METHOD_CALLS, one
from .conftest import MakeDaemon

pytestmark = pytest.mark.root


def test_runs_without_a_bus(stack: h.Stack) -> None:
    with h.daemon_in_netns(stack.bus, {h.LINK_A: "host"}) as daemon:
        missing = stack.workdir / "no-such-bus"
        daemon.start(wait=False, env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={missing}"})
        h.wait_until(lambda: "tproxyd ready" in daemon.log.read_text(), 20, "tproxyd ready without a bus")
        log = daemon.log.read_text()
        assert log.count("no system bus") == 1 and "running without the D-Bus API" in log
        assert "tpdv0" in daemon.netns.nft_table()
        assert daemon.proc is not None
        daemon.proc.terminate()
        assert daemon.proc.wait(15) == 0
        assert daemon.netns.nft_table() == ""


def test_second_instance_refuses_to_start(daemon: h.Tproxyd, make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    second = make_daemon(links={h.LINK_A: "host"}, start=False)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(20) == 1
    assert "another process already owns io.github.Tproxyd" in second.log.read_text()
    assert second.netns.nft_table() == ""  # it stopped before touching its kernel
    assert daemon.alive() and bus.properties()["State"] == "active"


def test_only_root_may_own_the_name(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    daemon.stop()
    script = (
        "import asyncio\n"
        "from dbus_fast.aio import MessageBus\nfrom dbus_fast import BusType\n"
        "from dbus_fast.errors import DBusError\n"
        "async def main():\n"
        "    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()\n"
        "    try:\n"
        f"        await bus.request_name('{names.BUS_NAME}')\n"
        "        print('owned')\n"
        "    except DBusError as e:\n"
        "        print(e.type)\n"
        "asyncio.run(main())\n"
    )
    proc = h.as_user(h.PLAIN, [str(h.PYTHON), "-c", script], bus.env())
    assert proc.stdout.strip() == names.ERROR_ACCESS_DENIED, proc.stderr


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, Path]]:
    workdir = h.new_workdir()
    path = workdir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        workdir.rmdir()


def _receive_until(sock: socket.socket, wanted: str, timeout: float = 20) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if wanted in messages[-1]:
            return messages
    raise AssertionError(f"no {wanted!r} from sd_notify within {timeout}s; got {messages}")


def test_ready_after_owning_the_name_then_status_updates(
    make_daemon: MakeDaemon, bus: h.PrivateBus, notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    daemon = make_daemon(links={h.LINK_A: "host"}, start=False)
    daemon.start(wait=False, env={"NOTIFY_SOCKET": str(path)})
    messages = _receive_until(sock, "READY=1")
    assert bus.has_owner(names.BUS_NAME)  # the name came first
    assert bus.properties()["State"] == "active"  # and the first reconcile
    assert "STATUS=state active, active on tpdv0" in messages[-1]
    assert bus.call("SetEnabled", "b", [False]).error is None
    _receive_until(sock, "STATUS=state off")


@pytest.fixture
def bus_without_polkit() -> Iterator[h.PrivateBus]:
    workdir = h.new_workdir()
    bus = h.PrivateBus(workdir)
    try:
        bus.start()
        yield bus
    finally:
        bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_without_polkit_only_root_is_allowed(bus_without_polkit: h.PrivateBus) -> None:
    bus = bus_without_polkit
    with h.daemon_in_netns(bus, {h.LINK_A: "host"}) as daemon:
        daemon.start()
        for method, call in METHOD_CALLS.items():
            assert one(h.ROOT, bus, call)["error"] is None, method
            denied = one(h.GRANTED, bus, call)
            assert denied["error"] == names.ERROR_ACCESS_DENIED, method
            assert "polkit is not running, so only root may" in denied["message"]
        assert daemon.log.read_text().count("only root may change tproxyd until polkit answers") == 1  # logged once


def test_losing_the_bus_keeps_the_daemon_running(bus_without_polkit: h.PrivateBus) -> None:
    bus = bus_without_polkit
    with h.daemon_in_netns(bus, {h.LINK_A: "host"}) as daemon:
        daemon.start()
        table = daemon.netns.nft_table()
        bus.stop()
        h.wait_until(lambda: "lost the system bus connection" in daemon.log.read_text(), 10, "the loss to be logged")
        assert daemon.alive() and daemon.netns.nft_table() == table
        assert daemon.proc is not None
        daemon.proc.terminate()
        assert daemon.proc.wait(15) == 0
        assert daemon.netns.nft_table() == ""


def test_restarted_bus_gets_the_name_back(bus_without_polkit: h.PrivateBus) -> None:
    """dbus-daemon restarted: tproxyd keeps its rules, reconnects and owns its name again."""
    bus = bus_without_polkit
    with h.daemon_in_netns(bus, {h.LINK_A: "host"}) as daemon:
        daemon.start()
        table = daemon.netns.nft_table()
        for _ in range(2):  # and again: the reconnected connection is watched as well
            bus.restart()
            h.wait_until(lambda: bus.has_owner(names.BUS_NAME), 20, "tproxyd to own its name on the new bus")
            assert daemon.alive() and daemon.netns.nft_table() == table
            assert bus.properties()["State"] == "active"
        assert one(h.ROOT, bus, ["EnableLink", "ss", [h.LINK_B, "lan"]])["error"] is None
        assert '"tpdv1"' in daemon.netns.nft_table()
        assert daemon.log.read_text().count("lost the system bus connection; the rules stay") == 2


def test_bus_that_appears_after_the_start(stack: h.Stack) -> None:
    """No bus at start (say, tproxyd ordered before dbus at boot): it owns its name once one is up."""
    workdir = h.new_workdir()
    late = h.PrivateBus(workdir)
    try:
        with h.daemon_in_netns(stack.bus, {h.LINK_A: "host"}) as daemon:
            daemon.start(wait=False, env={"DBUS_SYSTEM_BUS_ADDRESS": late.address})
            h.wait_until(lambda: "tproxyd ready" in daemon.log.read_text(), 20, "tproxyd ready without a bus")
            assert "no system bus" in daemon.log.read_text()
            late.start()
            h.wait_until(lambda: late.has_owner(names.BUS_NAME), 20, "tproxyd to own its name on the late bus")
            assert late.properties()["ActiveLinks"] == [h.LINK_A]
    finally:
        late.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_dbus_activation(make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    """The shipped activation file, with only Exec= pointed at this checkout (and the test's
    namespace), starts tproxyd on the first call, made by a plain user."""
    daemon = make_daemon(links={h.LINK_A: "host"}, start=False)
    shipped = h.SHIPPED_ACTIVATION.read_text()
    exec_line = f"Exec=/usr/sbin/ip netns exec {daemon.netns.name} {h.TPROXYD} --config {daemon.config}"
    assert "\nExec=/usr/bin/tproxyd\n" in shipped
    service = bus.dir / "services" / "io.github.Tproxyd.service"
    service.write_text(shipped.replace("Exec=/usr/bin/tproxyd", exec_line))
    pid = 0
    try:
        proc = h.as_user(
            h.PLAIN,
            ["busctl", "get-property", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, "Version"],
            bus.env(),
        )
        assert proc.returncode == 0, proc.stderr
        pid = _owner_pid(bus)
        h.wait_until(lambda: bus.properties()["State"] == "active", 20, "the activated tproxyd to be active")
        assert "tpdv0" in daemon.netns.nft_table()
    finally:
        service.unlink()
        pid = pid or _owner_pid(bus)  # activated even if the call above failed: never leave it running
        if pid:
            os.kill(pid, signal.SIGTERM)  # the activated tproxyd: a child of our dbus-daemon
            h.wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 15, "tproxyd to exit")
            h.wait_until(lambda: not bus.has_owner(names.BUS_NAME), 10, "the name to be released")
    assert daemon.netns.nft_table() == ""


def _owner_pid(bus: h.PrivateBus) -> int:
    """The PID of the process owning io.github.Tproxyd on `bus`, 0 when nobody does."""
    reply = bus.call(
        "GetConnectionUnixProcessID",
        "s",
        [names.BUS_NAME],
        interface=names.DBUS_IFACE,
        destination=names.DBUS_NAME,
        path=names.DBUS_PATH,
    )
    return int(reply.body[0]) if reply.error is None else 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
