"""Calling other D-Bus services: one method-call helper with one error mapping (an error reply is
a CallError), one AddMatch (and RemoveMatch), one Variant unwrapper. The daemon's adapters (polkit, systemd,
NetworkManager) and tproxyctl use these."""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from .names import DBUS_IFACE, DBUS_NAME, DBUS_PATH


class CallError(Exception):
    """The callee answered with an error: `name` is the D-Bus error name, `text` its message
    ("" when it sent none)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name
        self.text = text


def method_call(
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    flags: MessageFlag = MessageFlag.NONE,
) -> Message:
    return Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body or [],
        flags=flags,
    )


async def call_method(bus: MessageBus, message: Message, timeout: float | None = None) -> list[Any]:
    """The reply's body. Raises CallError for an error reply, TimeoutError after `timeout` s (None:
    wait as long as the bus does), and whatever dbus-fast raises when the connection fails."""
    reply = await asyncio.wait_for(bus.call(message), timeout)
    assert reply is not None  # only a NO_REPLY_EXPECTED call has no reply
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise CallError(reply.error_name or "error", text)
    return list(reply.body)


async def add_match(bus: MessageBus, rule: str, timeout: float | None = None) -> None:
    """Subscribe `bus` to the signals `rule` matches (the bus daemon's AddMatch)."""
    await call_method(bus, method_call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "AddMatch", "s", [rule]), timeout)


async def remove_match(bus: MessageBus, rule: str, timeout: float | None = None) -> None:
    await call_method(bus, method_call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "RemoveMatch", "s", [rule]), timeout)


def plain(value: Any) -> Any:
    """Variants (nested ones too) -> plain Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
