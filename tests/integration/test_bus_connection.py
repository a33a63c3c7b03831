"""The system-bus connection's workaround for a full socket buffer (bus/connection.py) against a
real dbus-daemon of its own, which the test freezes (SIGSTOP) so that our socket fills up."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tproxy_service.bus import names
from tproxy_service.bus.connection import _FullBufferIsShortWrite, connect_system_bus

from . import harness as h

FILL = 4096  # bytes per signal: small enough that the kernel refuses (EAGAIN) rather than splits
SIGNALS = 4000  # 16 MiB: far more than a unix socket's send buffer


@pytest.fixture
def frozen_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[h.PrivateBus]:
    """A private bus of this test's own (the session's bus is never frozen)."""
    workdir = h.new_workdir()
    bus = h.PrivateBus(workdir)
    try:
        bus.start()
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        yield bus
    finally:
        if bus.proc is not None:
            os.kill(bus.proc.pid, signal.SIGCONT)
        bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _writer_backed_up(bus: MessageBus) -> bool:
    writer = bus._writer  # type: ignore[attr-defined]
    return writer.buf is not None or bool(writer.messages)


def test_workaround_is_installed_on_the_private_writer(frozen_bus: h.PrivateBus) -> None:
    """Fails when a dbus-fast upgrade renames or drops MessageBus._writer.sock."""

    async def body() -> None:
        bus = await connect_system_bus()
        try:
            assert isinstance(bus._writer.sock, _FullBufferIsShortWrite)  # type: ignore[attr-defined]
        finally:
            bus.disconnect()

    asyncio.run(body())


def test_full_socket_buffer_keeps_the_connection(frozen_bus: h.PrivateBus) -> None:
    """While the daemon reads nothing, our sends fill the socket and the kernel answers EAGAIN;
    the connection must wait for the socket instead of dropping, and deliver everything later."""
    assert frozen_bus.proc is not None
    pid = frozen_bus.proc.pid

    async def body() -> None:
        bus = await connect_system_bus()
        try:
            os.kill(pid, signal.SIGSTOP)
            sent = []
            dropped: OSError | None = None
            for _ in range(SIGNALS):
                fill = Message(
                    message_type=MessageType.SIGNAL,
                    path="/io/github/Tproxyd/Test",
                    interface="io.github.Tproxyd.Test",
                    member="Fill",
                    signature="s",
                    body=["x" * FILL],
                )
                try:
                    sent.append(bus.send(fill))
                except OSError as e:  # dbus-fast dropped the connection inside send
                    dropped = e
                    break
            # bus.send writes at once while nothing is queued, so the EAGAIN has happened by now.
            assert dropped is None and bus.connected, f"a full socket buffer dropped the connection ({dropped})"
            assert _writer_backed_up(bus), "the socket never filled up: the test proves nothing"
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*sent), timeout=60)
            reply = await asyncio.wait_for(
                bus.call(
                    Message(
                        destination=names.DBUS_NAME,
                        path=names.DBUS_PATH,
                        interface=names.DBUS_IFACE,
                        member="GetId",
                    )
                ),
                timeout=30,
            )
            assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
            assert bus.connected
        finally:
            os.kill(pid, signal.SIGCONT)
            bus.disconnect()

    asyncio.run(body())
