"""Authorization of D-Bus callers: uid 0 without polkit, everyone else with polkit.

The caller's uid is asked from the bus (GetConnectionUnixUser, as systemd's own services do) and
remembered per unique name (the bus never reuses one); root is allowed at once, so no flood of
others' calls in front of polkit can keep root out. Others are authorized by polkit for their
unique bus name (dbus-fast's @method handlers do not see it, so the service passes the raw message
in); AllowUserInteraction follows the message's ALLOW_INTERACTIVE_AUTHORIZATION flag. Everything
fails closed: a polkit error is a denial with the reason in the message, and a polkitd that is
not on the bus, dies during the check or does not answer in time counts as no polkit at all:
nobody but root is allowed (logged once)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict

from dbus_fast import Message, MessageFlag, Variant
from dbus_fast.aio import MessageBus

from .call import CallError, call_method, method_call
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
# polkitd not on the bus, or gone in the middle of our call.
_POLKIT_ABSENT = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
)
_ALLOW_USER_INTERACTION = 1  # polkit CheckAuthorizationFlags
UID_LOOKUPS_IN_FLIGHT = 16  # GetConnectionUnixUser calls at once; the bus answers them at once
_UIDS_REMEMBERED = 1024


class Authorizer:
    def __init__(self, bus: MessageBus, timeout: float = 25.0, interactive_timeout: float = 300.0) -> None:
        self._bus = bus
        self._timeout = timeout
        # A person may be typing a password into their agent.
        self._interactive_timeout = interactive_timeout
        self._ids = itertools.count(1)
        self._warned_no_polkit = False
        self._uids: OrderedDict[str, int] = OrderedDict()
        self._lookups = asyncio.Semaphore(UID_LOOKUPS_IN_FLIGHT)

    async def is_root(self, sender: str) -> bool:
        """Whether the connection `sender` belongs to uid 0 (False when the bus cannot say)."""
        uid = self._uids.get(sender)
        if uid is None:
            request = method_call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetConnectionUnixUser", "s", [sender])
            async with self._lookups:
                try:
                    (uid,) = await call_method(self._bus, request, self._timeout)
                except Exception:  # an error reply, a timeout, a lost connection: the bus cannot say
                    return False
            uid = int(uid)
            self._uids[sender] = uid
            if len(self._uids) > _UIDS_REMEMBERED:
                self._uids.popitem(last=False)
        return uid == 0

    async def check(self, call: Message, action: str) -> None:
        """Return if the sender of `call` may perform `action`, else raise NotAuthorized."""
        verb = VERBS.get(action, action)
        sender = call.sender
        if not sender:  # only a peer-to-peer connection has none; we never serve those
            raise NotAuthorized(f"not authorized to {verb} tproxyd: the caller is unknown")
        if await self.is_root(sender):
            return
        interactive = bool(call.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        cancel_id = f"tproxyd-{next(self._ids)}"
        request = method_call(
            POLKIT_NAME,
            POLKIT_PATH,
            POLKIT_IFACE,
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            [
                ["system-bus-name", {"name": Variant("s", sender)}],
                action,
                {},
                _ALLOW_USER_INTERACTION if interactive else 0,
                cancel_id,
            ],
        )
        timeout = self._interactive_timeout if interactive else self._timeout
        try:
            (result,) = await call_method(self._bus, request, timeout)
        except TimeoutError:
            self._cancel(cancel_id)
            raise self._no_polkit(verb, f"polkit did not answer within {timeout:g} seconds") from None
        except CallError as e:
            if e.name in _POLKIT_ABSENT:
                raise self._no_polkit(verb, "polkit is not running") from None
            raise NotAuthorized(f"not authorized to {verb} tproxyd: polkit failed ({e.text or e.name})") from None
        except Exception as e:  # the bus connection failed under us
            raise NotAuthorized(f"not authorized to {verb} tproxyd: could not ask polkit ({e})") from None
        self._warned_no_polkit = False  # polkit answers: warn again at its next outage
        authorized, challenge, _details = result
        if authorized:
            return
        if challenge and not interactive:
            # The caller may retry allowing interactive authorization (an agent then asks).
            raise NotAuthorized(f"not authorized to {verb} tproxyd (polkit): authentication is required")
        raise NotAuthorized(f"not authorized to {verb} tproxyd (polkit)")

    def _no_polkit(self, verb: str, why: str) -> NotAuthorized:
        """polkitd missing, dead or hung: like no polkit at all, only root (already let through)."""
        if not self._warned_no_polkit:
            log.warning("%s: only root may change tproxyd until polkit answers again", why)
            self._warned_no_polkit = True
        return NotAuthorized(f"not authorized to {verb} tproxyd: {why}, so only root may")

    def _cancel(self, cancel_id: str) -> None:
        self._bus.send(
            method_call(
                POLKIT_NAME,
                POLKIT_PATH,
                POLKIT_IFACE,
                "CancelCheckAuthorization",
                "s",
                [cancel_id],
                MessageFlag.NO_REPLY_EXPECTED,
            )
        )
