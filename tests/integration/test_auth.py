"""tproxy_service.bus.auth against the real polkitd: root is allowed without polkit, others are
asked about; it fails closed, with the reason, when polkit errs, and a polkitd that does not
answer in time or dies during the check counts as no polkit (root only)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Iterator

import pytest
from dbus_fast import Message, MessageFlag
from dbus_fast.aio import MessageBus

from tproxy_service.bus import names
from tproxy_service.bus.auth import Authorizer
from tproxy_service.bus.errors import NotAuthorized

from . import harness as h

pytestmark = pytest.mark.root


def check(
    bus: h.PrivateBus,
    action: str,
    subject: str = "",
    timeout: float = 5,
    flags: MessageFlag = MessageFlag.NONE,
    deadline: float = 60,
) -> str:
    """Authorize the connection `subject` (default: our own, root's) for `action`; "" when
    allowed, else the denial's message. TimeoutError when no answer came within `deadline` s."""

    async def run() -> str:
        conn = await MessageBus(bus_address=bus.address).connect()
        try:
            sender = subject or conn.unique_name
            call = Message(path=names.OBJECT_PATH, member="EnableLink", sender=sender, flags=flags)
            await Authorizer(conn, timeout=timeout, interactive_timeout=timeout).check(call, action)
            return ""
        except NotAuthorized as e:
            return str(e)
        finally:
            conn.disconnect()

    return asyncio.run(asyncio.wait_for(run(), deadline))


@contextlib.contextmanager
def granted_user_connection(bus: h.PrivateBus) -> Iterator[str]:
    """The unique name of a connection of the user our polkit rule grants everything."""
    proc = h.user_popen(h.GRANTED, [str(h.PYTHON), str(h.BUSCLIENT), "hold"], bus.env(), stdin=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name.startswith(":"), proc.stderr.read() if proc.stderr else name
        yield name
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


@pytest.fixture
def granted_connection(bus: h.PrivateBus) -> Iterator[str]:
    with granted_user_connection(bus) as name:
        yield name


@pytest.fixture
def stopped_polkitd(stack: h.Stack) -> Iterator[None]:
    assert stack.polkit.proc is not None
    stack.polkit.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        stack.polkit.proc.send_signal(signal.SIGCONT)


def test_root_and_granted_user_are_authorized(bus: h.PrivateBus, granted_connection: str) -> None:
    assert check(bus, names.ACTION_TOGGLE) == ""
    assert check(bus, names.ACTION_CONFIGURE, flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION) == ""
    assert check(bus, names.ACTION_CONFIGURE, granted_connection) == ""


def test_root_does_not_wait_for_polkit(bus: h.PrivateBus, stopped_polkitd: None) -> None:
    """uid 0 (asked from the bus) is allowed without polkit: a hung polkitd cannot lock root out."""
    # polkit's answer is never awaited: with an hour to wait for a stopped polkitd, the check
    # still ends (generously) within the deadline.
    assert check(bus, names.ACTION_TOGGLE, timeout=3600, deadline=30) == ""


def test_polkit_timeout_is_no_polkit(bus: h.PrivateBus, granted_connection: str, stopped_polkitd: None) -> None:
    # The answer names the 0.5 s timeout: the check ended on it, not on the bus's own call timeout.
    assert check(bus, names.ACTION_TOGGLE, granted_connection, timeout=0.5) == (
        "not authorized to toggle tproxyd: polkit did not answer within 0.5 seconds, so only root may"
    )


def test_polkit_error_fails_closed(bus: h.PrivateBus, granted_connection: str) -> None:
    denied = check(bus, "io.github.Tproxyd.no-such-action", granted_connection)
    assert denied.startswith("not authorized to io.github.Tproxyd.no-such-action tproxyd: polkit failed (")
    assert "not registered" in denied


def check_while_polkitd_dies(bus: h.PrivateBus, polkitd: subprocess.Popen[bytes], subject: str) -> str:
    """Authorize `subject`; kill polkitd once the bus has routed our CheckAuthorization to it."""

    async def run() -> str:
        conn = await MessageBus(bus_address=bus.address).connect()
        sent = asyncio.Event()

        class Spy:
            """The connection as the Authorizer uses it, telling us when the check goes out."""

            async def call(self, msg: Message) -> Message | None:
                if msg.member == "CheckAuthorization":
                    sent.set()  # the call below queues it before the waiter runs
                return await conn.call(msg)

            def send(self, msg: Message) -> None:
                conn.send(msg)

        try:
            call = Message(path=names.OBJECT_PATH, member="EnableLink", sender=subject)
            task = asyncio.create_task(Authorizer(Spy(), timeout=20).check(call, names.ACTION_TOGGLE))  # type: ignore[arg-type]
            await sent.wait()
            # The bus handles a connection's messages in order: once this is answered, our check
            # sits with polkitd, which can no longer answer it.
            ping = Message(
                destination=names.DBUS_NAME, path=names.DBUS_PATH, interface=names.DBUS_IFACE, member="GetId"
            )
            await conn.call(ping)
            polkitd.kill()
            await task
            return ""
        except NotAuthorized as e:
            return str(e)
        finally:
            conn.disconnect()

    return asyncio.run(run())


def test_polkitd_dying_during_the_check_is_no_polkit() -> None:
    """On a stack of its own: polkitd is stopped, receives our check, and is killed."""
    with h.stack() as own, granted_user_connection(own.bus) as subject:
        assert own.polkit.proc is not None
        own.polkit.proc.send_signal(signal.SIGSTOP)
        denied = check_while_polkitd_dies(own.bus, own.polkit.proc, subject)
        assert denied == "not authorized to toggle tproxyd: polkit is not running, so only root may"
