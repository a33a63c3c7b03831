"""Connecting to the system bus ($DBUS_SYSTEM_BUS_ADDRESS honoured), with one workaround.

dbus-fast (5.2, inherited from dbus-next: altdesktop/python-dbus-next#153) treats EAGAIN from a
full socket buffer as a fatal error and drops the connection. A burst of replies (a flood of
calls) or of large messages can fill the buffer, and the daemon would silently lose its D-Bus
API. The writer already handles short writes by waiting until the socket is writable, so we
make a full buffer look like a zero-byte write."""

from __future__ import annotations

import importlib.metadata
import logging
import socket
from typing import Any

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

log = logging.getLogger(__name__)


class _FullBufferIsShortWrite:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def sendmsg(self, *args: Any) -> int:
        try:
            return self._sock.sendmsg(*args)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def patch_full_buffer(bus: MessageBus) -> bool:
    """Installs the workaround on a connected bus; False (with an error in the log) when this
    dbus-fast no longer has the private `_writer.sock` it patches. The pinned dbus-fast has it,
    and tests/integration/test_bus_connection.py fails when an upgrade removes it."""
    writer: Any = getattr(bus, "_writer", None)
    sock = getattr(writer, "sock", None)
    if isinstance(sock, _FullBufferIsShortWrite):
        return True
    if not isinstance(sock, socket.socket):
        log.error(
            "dbus-fast %s has no MessageBus._writer.sock: the workaround for a full socket buffer is "
            "not applied, so a burst of D-Bus traffic can drop this connection (install the pinned "
            "dbus-fast from requirements/runtime.txt)",
            _dbus_fast_version(),
        )
        return False
    writer.sock = _FullBufferIsShortWrite(sock)
    return True


def _dbus_fast_version() -> str:
    try:
        return importlib.metadata.version("dbus-fast")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


async def connect_system_bus() -> MessageBus:
    """Raises OSError (or dbus-fast's AuthError...) when the bus is not reachable."""
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    patch_full_buffer(bus)
    return bus
