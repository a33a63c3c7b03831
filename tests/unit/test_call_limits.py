"""CallLimits of D-Bus calls: per-connection and unprivileged-total caps, refused at once with Busy
naming the limit, and every slot given back however the call ends."""

from __future__ import annotations

import contextlib

import pytest

from tproxy_service.bus.call_limits import CallLimits
from tproxy_service.bus.errors import Busy


def test_per_connection_cap_and_release() -> None:
    limits = CallLimits(per_connection=2, unprivileged_total=10)
    with contextlib.ExitStack() as held:
        held.enter_context(limits.connection(":1.1"))
        held.enter_context(limits.connection(":1.1"))
        with pytest.raises(Busy, match="this connection already has 2 calls in flight"):
            held.enter_context(limits.connection(":1.1"))
        held.enter_context(limits.connection(":1.2"))  # another connection is not affected
    with limits.connection(":1.1"), limits.connection(":1.1"):
        pass  # all slots came back


def test_unprivileged_total_cap_and_release_on_error() -> None:
    limits = CallLimits(per_connection=10, unprivileged_total=1)
    with pytest.raises(RuntimeError), limits.unprivileged():
        raise RuntimeError("the call failed")
    busy = pytest.raises(Busy, match="1 calls of unprivileged callers are in flight; retry later")
    with limits.unprivileged(), busy, limits.unprivileged():
        pass
