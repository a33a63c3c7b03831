"""Connecting to the system bus ($DBUS_SYSTEM_BUS_ADDRESS honoured), with one workaround.

dbus-fast (5.2, inherited from dbus-next: altdesktop/python-dbus-next#153) treats EAGAIN from a
full socket buffer as a fatal error and drops the connection. A burst of replies (a flood of
calls) or of large messages can fill the buffer, and the daemon would silently lose its D-Bus
API. The writer already handles short writes by waiting until the socket is writable, so we
make a full buffer look like a zero-byte write."""

from __future__ import annotations

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


async def connect_system_bus() -> MessageBus:
    """Raises OSError (or dbus-fast's AuthError...) when the bus is not reachable."""
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    writer = getattr(bus, "_writer", None)
    if writer is not None and isinstance(getattr(writer, "sock", None), socket.socket):
        writer.sock = _FullBufferIsShortWrite(writer.sock)
    else:  # a dbus-fast that changed its internals: run without the workaround
        log.debug("dbus-fast writer internals changed; EAGAIN workaround not applied")
    return bus
