"""tproxy_service.bus.auth against the real polkitd: it fails closed, with the reason, when polkit
errs or does not answer in time, and honours ALLOW_INTERACTIVE_AUTHORIZATION."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import pytest
from dbus_fast import Message, MessageFlag
from dbus_fast.aio import MessageBus

from tproxy_service.bus import names
from tproxy_service.bus.auth import Authorizer
from tproxy_service.bus.errors import NotAuthorized

from . import harness as h

pytestmark = pytest.mark.root


def check(bus: h.PrivateBus, action: str, timeout: float = 5, flags: MessageFlag = MessageFlag.NONE) -> str:
    """Authorize ourselves (root) for `action`; "" when allowed, else the denial's message."""

    async def run() -> str:
        conn = await MessageBus(bus_address=bus.address).connect()
        try:
            call = Message(path=names.OBJECT_PATH, member="EnableLink", sender=conn.unique_name, flags=flags)
            await Authorizer(conn, timeout=timeout, interactive_timeout=timeout).check(call, action)
            return ""
        except NotAuthorized as e:
            return str(e)
        finally:
            conn.disconnect()

    return asyncio.run(run())


@pytest.fixture
def stopped_polkitd(stack: h.Stack) -> Iterator[None]:
    assert stack.polkit.proc is not None
    stack.polkit.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        stack.polkit.proc.send_signal(signal.SIGCONT)


def test_root_is_authorized(bus: h.PrivateBus) -> None:
    assert check(bus, names.ACTION_TOGGLE) == ""
    assert check(bus, names.ACTION_CONFIGURE, flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION) == ""


def test_polkit_timeout_fails_closed(bus: h.PrivateBus, stopped_polkitd: None) -> None:
    start = time.monotonic()
    assert check(bus, names.ACTION_TOGGLE, timeout=0.5) == (
        "not authorized to toggle tproxyd: polkit did not answer within 0.5 seconds"
    )
    assert time.monotonic() - start < 5


def test_polkit_error_fails_closed(bus: h.PrivateBus) -> None:
    denied = check(bus, "io.github.Tproxyd.no-such-action")
    assert denied.startswith("not authorized to io.github.Tproxyd.no-such-action tproxyd: polkit failed (")
    assert "not registered" in denied
