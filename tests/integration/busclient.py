"""A D-Bus client the tests run as other users (setpriv), on $DBUS_SYSTEM_BUS_ADDRESS.

    busclient.py batch   < [[member, signature, args], ...]   -> [{"error": name|null, "message": s}, ...]
    busclient.py flood CONNECTIONS CALLS < [[member, signature, args], ...]
        every connection sends CALLS calls at once, cycling through the given calls;
        -> {"counts": {error name or "ok": n}, "seconds": s}
    busclient.py interactive MEMBER SIGNATURE ARGS_JSON   one call with ALLOW_INTERACTIVE_AUTHORIZATION
    busclient.py hold   connect, print the connection's unique name (one line), stay until stdin closes

Stdout is one JSON document; the tests compare error names, so nothing else is printed."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType

from tproxy_service.bus import names
from tproxy_service.bus.connection import connect_system_bus

BUS_NAME, PATH, IFACE = names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE


def message(member: str, signature: str, args: list[Any], flags: MessageFlag = MessageFlag.NONE) -> Message:
    return Message(
        destination=BUS_NAME, path=PATH, interface=IFACE, member=member, signature=signature, body=args, flags=flags
    )


def outcome(reply: Message) -> dict[str, Any]:
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        return {"error": reply.error_name, "message": text}
    return {"error": None, "message": ""}


async def batch(calls: list[list[Any]]) -> list[dict[str, Any]]:
    bus = await connect_system_bus()
    try:
        return [outcome(await bus.call(message(*call))) for call in calls]
    finally:
        bus.disconnect()


async def flood(connections: int, per_connection: int, calls: list[list[Any]]) -> dict[str, Any]:
    buses = [await connect_system_bus() for _ in range(connections)]
    cycle = itertools.cycle(calls)
    start = time.monotonic()
    try:
        pending = [bus.call(message(*next(cycle))) for bus in buses for _ in range(per_connection)]
        replies = await asyncio.gather(*pending)
    finally:
        for bus in buses:
            bus.disconnect()
    counts = Counter(outcome(r)["error"] or "ok" for r in replies)
    return {"counts": dict(counts), "seconds": time.monotonic() - start}


async def interactive(member: str, signature: str, args: list[Any]) -> dict[str, Any]:
    bus = await connect_system_bus()
    try:
        return outcome(await bus.call(message(member, signature, args, MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)))
    finally:
        bus.disconnect()


async def hold() -> None:
    bus = await connect_system_bus()
    print(bus.unique_name, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    bus.disconnect()


def main() -> None:
    mode = sys.argv[1]
    if mode == "hold":
        asyncio.run(hold())
        return
    if mode == "batch":
        result: Any = asyncio.run(batch(json.load(sys.stdin)))
    elif mode == "flood":
        result = asyncio.run(flood(int(sys.argv[2]), int(sys.argv[3]), json.load(sys.stdin)))
    elif mode == "interactive":
        result = asyncio.run(interactive(sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
    else:
        raise SystemExit(f"unknown mode {mode}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
