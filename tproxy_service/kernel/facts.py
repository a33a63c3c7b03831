"""Reads the kernel facts a reconcile needs: links and addresses (one netlink dump each)."""

from __future__ import annotations

import socket

from ..model import AddressFact, Facts, LinkFact
from .rtnl import LazyRtnl

IFF_UP = 0x1


class FactsReader:
    def __init__(self) -> None:
        self._rtnl = LazyRtnl()

    async def read(self) -> Facts:
        ipr = self._rtnl.get()
        links = tuple(
            [
                LinkFact(name=msg.get("ifname"), index=msg["index"], up=bool(msg["flags"] & IFF_UP))
                async for msg in await ipr.link("dump")
            ]
        )
        addresses = tuple(
            [
                AddressFact(
                    link_index=msg["index"],
                    family=4 if msg["family"] == socket.AF_INET else 6,
                    address=msg.get("local") or msg.get("address"),
                    prefixlen=msg["prefixlen"],
                )
                async for msg in await ipr.addr("dump")
                if msg["family"] in (socket.AF_INET, socket.AF_INET6)
            ]
        )
        return Facts(links=links, addresses=addresses)

    def close(self) -> None:
        self._rtnl.close()
