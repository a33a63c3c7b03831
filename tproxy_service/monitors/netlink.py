"""rtnetlink monitor: links and addresses coming and going, and our policy rules or routes
deleted by someone else. Each event is one `request`; the engine coalesces bursts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
)

log = logging.getLogger(__name__)

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_DELROUTE = 25
RTM_DELRULE = 33
GROUPS = (
    RTMGRP_LINK
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_ROUTE
    | RTMGRP_IPV4_RULE
    | RTMGRP_IPV6_RULE
)


class NetlinkMonitor:
    """Calls `on_change(reason)` for link/address changes and `on_routing_drift(reason)` when a
    rule with our fwmark or a route in our table disappears."""

    def __init__(
        self,
        mark: Callable[[], int],
        table: Callable[[], int],
        on_change: Callable[[str], None],
        on_routing_drift: Callable[[str], None],
    ) -> None:
        self._mark = mark
        self._table = table
        self._on_change = on_change
        self._on_routing_drift = on_routing_drift
        self._task: asyncio.Task[None] | None = None
        self._ipr: Any = None

    async def start(self) -> None:
        self._ipr = AsyncIPRoute()
        await self._ipr.bind(groups=GROUPS)
        self._task = asyncio.create_task(self._run(), name="netlink-monitor")

    async def _run(self) -> None:
        assert self._ipr is not None
        while True:  # get() yields what one receive brought, then ends
            async for msg in self._ipr.get():
                try:
                    self._handle(msg)
                except Exception:  # one odd message must not stop the monitor
                    log.exception("could not handle a netlink event")

    def _handle(self, msg: Any) -> None:
        kind = msg["header"]["type"]
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            self._on_change(f"link {msg.get('ifname')} {'removed' if kind == RTM_DELLINK else 'changed'}")
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            self._on_change(f"address {msg.get('address')} {'removed' if kind == RTM_DELADDR else 'added'}")
        elif kind == RTM_DELRULE and msg.get("fwmark") == self._mark() and msg.get("table") == self._table():
            self._on_routing_drift("policy rule deleted")
        elif kind == RTM_DELROUTE and msg.get("table") == self._table():
            self._on_routing_drift("route deleted")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._ipr is not None:
            self._ipr.close()
