"""Checks shared by the tests beside firewalld, ufw and Docker."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tests.integration.harness import TPROXYCTL, PrivateBus, run

from . import harness as h

FLOWS = [(proto, family) for proto in ("tcp", "udp") for family in (4, 6)]
_COUNTERS = re.compile(r"\[\d+:\d+\]")


def all_proxied(lab: h.Lab) -> None:
    """lan (the client) and host (the gateway itself) mode, TCP and UDP over IPv4 and IPv6."""
    for proto, family in FLOWS:
        lan = h.send(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family))
        lab.proofs.proxied(lan, expected_peer=h.GW_UP.of(family))
        own = h.send(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family))
        lab.proofs.proxied(own, expected_peer=h.GW_UP.of(family))


def follows_the_firewall(
    lab: h.Lab, admitted: Callable[[], bool], came_up: str, rebuilds: Sequence[tuple[str, Callable[[], object]]]
) -> None:
    """tproxyd's rule is in the firewall after it `came_up` after tproxyd, and back after each of
    its `rebuilds` (what, how), which drop the rule; every path is proxied each time."""
    for what, rebuild in [(came_up, lambda: None), *rebuilds]:
        rebuild()
        h.wait_until(admitted, 15, f"tproxyd's rule after {what}")
        all_proxied(lab)


def iptables_save(output: str) -> str:
    """iptables-save output without packet counters and the timestamp comments."""
    return "\n".join(_COUNTERS.sub("", line) for line in output.splitlines() if not line.startswith("#"))


def assert_reported(bus: PrivateBus, *needles: str) -> None:
    """tproxyd is degraded and says why, with the fix, both in LastError over D-Bus and in
    `tproxyctl status` (the log is each test's own check)."""
    props = bus.properties()
    assert props["State"] == "degraded", props
    for needle in needles:
        assert needle in props["LastError"], (needle, props["LastError"])
    status = run([str(TPROXYCTL), "status"], check=False, env=bus.env()).stdout
    assert "State:          degraded" in status, status
    error_line = next((line for line in status.splitlines() if line.startswith("Last error:")), "")
    for needle in needles:
        assert needle in error_line, (needle, status)
