"""`failure_policy = "closed"` means not one packet direct from a proxied link: what tproxyd
cannot divert is dropped (checked at the router with the leak probe), and only what the bypass
names goes direct."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import harness as h
from .conftest import StartDaemon

pytestmark = pytest.mark.root


def test_ipv6_and_udp_off_are_dropped_not_direct(lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path) -> None:
    config = h.TproxydConfig(tmp_path / "conf", failure_policy="closed", ipv6=False, udp=False)
    start_tproxyd(config, wait=False).wait_log("tproxyd ready")  # (no IPv6 rule and route to wait for)
    undivertable = [("udp", 4), ("udp", 6), ("tcp", 6)]
    with lab.leaks.no_client_packets():
        for proto, family in undivertable:
            lab.proofs.blocked(h.attempt(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family)))
        flow = h.send("tcp", h.CLI, h.CLIENT.v4, h.SERVER.v4)  # what can be diverted still is
        lab.proofs.proxied(flow, expected_peer=h.GW_UP.v4)
    for proto, family in undivertable:  # the gateway's own traffic on its host link
        lab.proofs.blocked(h.attempt(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family)))
    # The bypass still applies: a directly connected host is reached direct, UDP and IPv6 alike.
    for source, src in (("lan", h.CLI), ("gateway", h.GW)):
        for proto, family in undivertable:
            addr = (h.CLIENT if source == "lan" else h.GW_UP).of(family)
            lab.proofs.direct(h.send(proto, src, addr, h.ROUTER.of(family)))
