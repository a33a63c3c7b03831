"""How many method calls tproxyd works on at once, so that no caller can starve the others.

Every call in flight may hold a pending polkit CheckAuthorization on tproxyd's one bus
connection, and the bus caps a connection's pending replies (128 on a stock system bus): past
that, polkit calls fail for everyone, root included. So calls are admitted under two caps, and a
call over either is refused at once with Busy: per connection (whoever the caller), and in total
for callers that are not root (root never waits for polkit, so its calls only count per
connection)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from .errors import Busy

PER_CONNECTION = 16
UNPRIVILEGED_TOTAL = 64  # with UID lookups (auth.UID_LOOKUPS_IN_FLIGHT) well under the bus's 128


class CallLimits:
    def __init__(self, per_connection: int = PER_CONNECTION, unprivileged_total: int = UNPRIVILEGED_TOTAL) -> None:
        self._per_connection = per_connection
        self._unprivileged_total = unprivileged_total
        self._by_sender: Counter[str] = Counter()
        self._unprivileged = 0

    @contextlib.contextmanager
    def connection(self, sender: str) -> Iterator[None]:
        if self._by_sender[sender] >= self._per_connection:
            raise Busy(
                f"tproxyd is busy: this connection already has {self._per_connection} calls in flight; "
                "wait for their replies"
            )
        self._by_sender[sender] += 1
        try:
            yield
        finally:
            self._by_sender[sender] -= 1
            if not self._by_sender[sender]:
                del self._by_sender[sender]

    @contextlib.contextmanager
    def unprivileged(self) -> Iterator[None]:
        if self._unprivileged >= self._unprivileged_total:
            raise Busy(
                f"tproxyd is busy: {self._unprivileged_total} calls of unprivileged callers are in flight; retry later"
            )
        self._unprivileged += 1
        try:
            yield
        finally:
            self._unprivileged -= 1
