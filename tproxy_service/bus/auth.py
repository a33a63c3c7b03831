"""Authorization of D-Bus callers with polkit.

The subject is the caller's unique bus name (dbus-fast's @method handlers do not see it, so the
service passes the raw message in). AllowUserInteraction follows the message's
ALLOW_INTERACTIVE_AUTHORIZATION flag. Everything fails closed: a polkit error or timeout is a
denial with the reason in the message. When polkitd is not on the bus at all, only uid 0 is
allowed (asked from the bus, logged once)."""

from __future__ import annotations

import asyncio
import itertools
import logging

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import NotAuthorized
from .names import (
    ACTION_CONFIGURE,
    ACTION_TOGGLE,
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    POLKIT_IFACE,
    POLKIT_NAME,
    POLKIT_PATH,
)

log = logging.getLogger(__name__)

VERBS = {ACTION_TOGGLE: "toggle", ACTION_CONFIGURE: "configure"}
_POLKIT_ABSENT = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")
_ALLOW_USER_INTERACTION = 1  # polkit CheckAuthorizationFlags


class Authorizer:
    def __init__(self, bus: MessageBus, timeout: float = 25.0, interactive_timeout: float = 300.0) -> None:
        self._bus = bus
        self._timeout = timeout
        # A person may be typing a password into their agent.
        self._interactive_timeout = interactive_timeout
        self._ids = itertools.count(1)
        self._warned_no_polkit = False

    async def check(self, call: Message, action: str) -> None:
        """Return if the sender of `call` may perform `action`, else raise NotAuthorized."""
        verb = VERBS.get(action, action)
        sender = call.sender
        if not sender:  # only a peer-to-peer connection has none; we never serve those
            raise NotAuthorized(f"not authorized to {verb} tproxyd: the caller is unknown")
        interactive = bool(call.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        cancel_id = f"tproxyd-{next(self._ids)}"
        request = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_IFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", sender)}],
                action,
                {},
                _ALLOW_USER_INTERACTION if interactive else 0,
                cancel_id,
            ],
        )
        timeout = self._interactive_timeout if interactive else self._timeout
        try:
            reply = await asyncio.wait_for(self._bus.call(request), timeout)
        except TimeoutError:
            self._cancel(cancel_id)
            raise NotAuthorized(
                f"not authorized to {verb} tproxyd: polkit did not answer within {timeout:g} seconds"
            ) from None
        except Exception as e:  # the bus connection failed under us
            raise NotAuthorized(f"not authorized to {verb} tproxyd: could not ask polkit ({e})") from None
        if reply.message_type is MessageType.ERROR:
            if reply.error_name in _POLKIT_ABSENT:
                await self._root_only(sender, verb)
                return
            detail = reply.body[0] if reply.body and isinstance(reply.body[0], str) else reply.error_name
            raise NotAuthorized(f"not authorized to {verb} tproxyd: polkit failed ({detail})")
        authorized, challenge, _details = reply.body[0]
        if authorized:
            return
        if challenge and not interactive:
            # The caller may retry allowing interactive authorization (an agent then asks).
            raise NotAuthorized(f"not authorized to {verb} tproxyd (polkit): authentication is required")
        raise NotAuthorized(f"not authorized to {verb} tproxyd (polkit)")

    async def _root_only(self, sender: str, verb: str) -> None:
        if not self._warned_no_polkit:
            log.warning("polkit is not on the system bus: only root may change tproxyd")
            self._warned_no_polkit = True
        request = Message(
            destination=DBUS_NAME,
            path=DBUS_PATH,
            interface=DBUS_IFACE,
            member="GetConnectionUnixUser",
            signature="s",
            body=[sender],
        )
        try:
            reply = await asyncio.wait_for(self._bus.call(request), self._timeout)
        except Exception:
            reply = None
        if reply is not None and reply.message_type is MessageType.METHOD_RETURN and reply.body[0] == 0:
            return
        raise NotAuthorized(f"not authorized to {verb} tproxyd: polkit is not running, so only root may")

    def _cancel(self, cancel_id: str) -> None:
        self._bus.send(
            Message(
                destination=POLKIT_NAME,
                path=POLKIT_PATH,
                interface=POLKIT_IFACE,
                member="CancelCheckAuthorization",
                signature="s",
                body=[cancel_id],
                flags=MessageFlag.NO_REPLY_EXPECTED,
            )
        )
