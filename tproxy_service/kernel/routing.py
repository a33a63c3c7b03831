"""Policy-routing adapter (pyroute2 AsyncIPRoute): our fwmark rules and `local default dev lo`
routes, each exactly once. `ip rule add` happily creates duplicates, so `ensure` reads what is
there first and removes extra copies (e.g. left by a crashed run)."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import Counter
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from ..errors import KernelError
from ..model import RouteSpec, RoutingState, RuleSpec
from .rtnl import LazyRtnl

log = logging.getLogger(__name__)
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT_DST = {4: "0.0.0.0/0", 6: "::/0"}
RTN_LOCAL = 2
LOOPBACK_INDEX = 1


class RoutingAdapter:
    def __init__(self) -> None:
        self._rtnl = LazyRtnl()

    async def _our_rules(self, spec: RuleSpec) -> list[int]:
        """Priorities of the rules sending our mark to our table. Any priority counts: a crashed
        run with another rule_priority, or `ip rule add` without one, leaves such copies."""
        ipr = self._rtnl.get()
        return [
            msg.get("priority", 0)
            async for msg in await ipr.rule("dump", family=_AF[spec.family])
            if msg.get("fwmark") == spec.fwmark and msg.get("table") == spec.table
        ]

    async def _route_count(self, spec: RouteSpec) -> int:
        ipr = self._rtnl.get()
        count = 0
        async for msg in await ipr.route("dump", family=_AF[spec.family], table=spec.table):
            if msg["dst_len"] == 0 and msg["type"] == RTN_LOCAL and msg.get("table") == spec.table:
                count += 1
        return count

    def _rule_args(self, spec: RuleSpec) -> dict[str, Any]:
        return {
            "family": _AF[spec.family],
            "fwmark": spec.fwmark,
            "table": spec.table,
            "priority": spec.priority,
        }

    def _route_args(self, spec: RouteSpec) -> dict[str, Any]:
        return {
            "family": _AF[spec.family],
            "dst": _DEFAULT_DST[spec.family],
            "type": "local",
            "scope": "host",  # a local route needs host scope (EINVAL otherwise)
            "oif": LOOPBACK_INDEX,
            "table": spec.table,
        }

    async def ensure(self, state: RoutingState) -> None:
        """Make every rule and route of `state` present exactly once."""
        ipr = self._rtnl.get()
        try:
            for rule in state.rules:
                priorities = await self._our_rules(rule)
                keep = rule.priority in priorities
                extra = list(priorities)
                if keep:
                    extra.remove(rule.priority)
                for priority in extra:
                    log.info("removing a stale or duplicate policy rule (priority %d): %s", priority, rule)
                    args = {**self._rule_args(rule), "priority": priority}
                    await _tolerate(ipr.rule("del", **args), errno.ENOENT)
                if not keep:
                    await _tolerate(ipr.rule("add", **self._rule_args(rule)), errno.EEXIST)
            for route in state.routes:
                count = await self._route_count(route)
                if count == 0:
                    await _tolerate(ipr.route("add", **self._route_args(route)), errno.EEXIST)
        except NetlinkError as e:
            raise KernelError(f"setting up policy routing failed: {os.strerror(e.code)}") from None

    async def remove(self, state: RoutingState) -> None:
        """Remove every copy of our rules and routes; missing ones are fine."""
        ipr = self._rtnl.get()
        try:
            for rule in state.rules:
                for priority in await self._our_rules(rule):
                    args = {**self._rule_args(rule), "priority": priority}
                    await _tolerate(ipr.rule("del", **args), errno.ENOENT)
            for route in state.routes:
                for _ in range(await self._route_count(route)):
                    await _tolerate(ipr.route("del", **self._route_args(route)), errno.ESRCH, errno.ENOENT)
        except NetlinkError as e:
            raise KernelError(f"removing policy routing failed: {os.strerror(e.code)}") from None

    async def count(self, state: RoutingState) -> Counter[RuleSpec | RouteSpec]:
        """For checks: how many copies of each of our rules and routes exist."""
        found: Counter[RuleSpec | RouteSpec] = Counter()
        for rule in state.rules:
            found[rule] = (await self._our_rules(rule)).count(rule.priority)
        for route in state.routes:
            found[route] = await self._route_count(route)
        return found

    def close(self) -> None:
        self._rtnl.close()


async def _tolerate(awaitable: Any, *codes: int) -> None:
    try:
        await awaitable
    except NetlinkError as e:
        if e.code not in codes:
            raise
