"""Checks shared by the tests beside firewalld, ufw and Docker."""

from __future__ import annotations

import re

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


def iptables_save(output: str) -> str:
    """iptables-save output without packet counters and the timestamp comments."""
    return "\n".join(_COUNTERS.sub("", line) for line in output.splitlines() if not line.startswith("#"))
