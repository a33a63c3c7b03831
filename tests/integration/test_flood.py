"""No unprivileged caller can deny service: a plain user's flood of calls is refused with Busy
beyond the documented caps, before it reaches polkit, while root's calls keep succeeding."""

from __future__ import annotations

import pytest

from tproxy_service.bus import names
from tproxy_service.bus.call_limits import PER_CONNECTION

from . import harness as h
from .calls import finish_flood, start_flood

pytestmark = pytest.mark.root

LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
TOGGLES = [["EnableLink", "ss", [h.LINK_B, "lan"]], ["DisableLink", "s", [h.LINK_B]]]


def root_toggle(bus: h.PrivateBus, enable: bool) -> h.Reply:
    """One call on a fresh connection of root's, as busctl and the dispatcher hook make them."""
    if enable:
        return bus.call("EnableLink", "ss", [h.LINK_B, "lan"])
    return bus.call("DisableLink", "s", [h.LINK_B])


def test_plain_users_flood_does_not_lock_root_out(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    flood = start_flood(h.PLAIN, bus, 10, 1000, [["EnableLink", "ss", [h.LINK_B, "host"]]])
    root_replies = []
    try:
        # Root keeps toggling for as long as the flood lasts (at least 10 calls, all during it).
        while flood.poll() is None or len(root_replies) < 10:
            during = flood.poll() is None
            reply = root_toggle(bus, enable=len(root_replies) % 2 == 0)
            root_replies.append((during, reply))
    finally:
        result = finish_flood(flood)
    assert all(reply.error is None for _, reply in root_replies), [r for _, r in root_replies if r.error][:3]
    assert sum(during for during, _ in root_replies) >= 1, "no root call overlapped the flood"
    counts = result["counts"]
    print(f"flood: {counts} in {result['seconds']:.1f} s; root calls during it: {len(root_replies)}")
    assert sum(counts.values()) == 10_000
    # LimitsExceeded: the bus itself refuses a connection's calls past its 128 pending replies.
    assert set(counts) <= {names.ERROR_ACCESS_DENIED, names.ERROR_BUSY, LIMITS_EXCEEDED}, counts
    assert counts.get(names.ERROR_BUSY, 0) > 0  # the caps were reached, and said so
    assert daemon.alive()
    assert bus.properties()["Links"] == {h.LINK_A: "host", **({h.LINK_B: "lan"} if len(root_replies) % 2 else {})}


def test_one_connection_gets_busy_beyond_its_cap(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    """A single connection with more calls in flight than its cap: the excess is refused at once."""
    result = finish_flood(start_flood(h.PLAIN, bus, 1, 4 * PER_CONNECTION, TOGGLES))
    counts = result["counts"]
    assert counts.get(names.ERROR_BUSY, 0) >= 1, counts
    assert counts.get(names.ERROR_ACCESS_DENIED, 0) >= 1, counts
