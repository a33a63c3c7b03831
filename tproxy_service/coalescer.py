"""Requests that coalesce into runs of one job: however many arrive while a run is going, one more
run follows (with all their reasons). `request` returns a ticket; `wait_for(ticket)` returns once
a run that started after that request has finished. Used by the reconcile engine and the
NetworkManager monitor (docs/architecture.md, "The reconcile pass")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Coalescer:
    def __init__(
        self,
        run: Callable[[list[str]], Awaitable[None]],
        name: str,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`run(reasons)` does the work; `after()` runs once the waiters of a run were released and
        before the next run starts (a back-off after a failure)."""
        self._run = run
        self._after = after
        self._name = name
        self._reasons: list[str] = []
        self._requested = 0
        self._completed = 0
        self._wake = asyncio.Event()
        self._done = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def request(self, reason: str) -> int:
        self._reasons.append(reason)
        self._requested += 1
        self._wake.set()
        return self._requested

    async def wait_for(self, ticket: int) -> None:
        async with self._done:
            await self._done.wait_for(lambda: self._completed >= ticket)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            # The flag, not only cancel(): a run may end with another error instead of
            # CancelledError (dbus-fast fails a pending call with EOFError when its connection
            # closes), and the loop would then go on and never end.
            self._stopping = True
            self._wake.set()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            if self._stopping:
                return
            self._wake.clear()
            ticket = self._requested
            reasons, self._reasons = self._reasons, []
            try:
                await self._run(reasons)
            except Exception:  # a bug must not kill the loop (and leave waiters hanging)
                if self._stopping:  # e.g. the bus connection closed under a pending call
                    log.debug("%s: run ended by the stop", self._name, exc_info=True)
                else:
                    log.exception("%s: run crashed", self._name)
            async with self._done:
                self._completed = ticket
                self._done.notify_all()
            if self._after is not None and not self._stopping:
                await self._after()
