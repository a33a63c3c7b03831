"""The rtnetlink socket (pyroute2 AsyncIPRoute) an adapter keeps between calls: opened on first
use, so building an adapter does no I/O, and closed with the adapter."""

from __future__ import annotations

from typing import Any

from pyroute2 import AsyncIPRoute


class LazyRtnl:
    def __init__(self) -> None:
        self._ipr: Any = None

    def get(self) -> Any:
        """The socket, opened by the first call."""
        if self._ipr is None:
            self._ipr = AsyncIPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
