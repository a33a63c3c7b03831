"""Links a [[networkmanager.auto]] policy holds are data too: NetworkManager connections on links
with hostile names, then full table replaces (`nft delete table`, a restart). The link sets hold
exactly those names, and the gateway's other traffic is not diverted ('*' as nft's catch-all
element would divert every link). NetworkManager reports `\\` escaped ("\\\\") on D-Bus."""

from __future__ import annotations

import json

import pytest

from . import harness as h

pytestmark = pytest.mark.root

HOSTILE = ["*", "@x", "eth*", "tcp", "\\", '"', "é" * 7 + "z"]  # the last: 15 bytes of UTF-8
POLICY = ({"type": "ethernet", "mode": "both"},)  # the café link stays down


def _sets_hold(w: h.World, what: str) -> None:
    expected = (set(HOSTILE), set(HOSTILE))
    h.wait_until(lambda: (h.set_elements(w.gw, "host_links"), h.set_elements(w.gw, "lan_links")) == expected, 20, what)


def test_policy_links_with_hostile_names_stay_literal(nm_world: h.World) -> None:
    w = nm_world
    assert w.core is not None
    for i, name in enumerate(HOSTILE):
        h.run("ip", "link", "add", name, "netns", w.gw, "type", "veth", "peer", "name", f"tpnh{i}", "netns", w.up)
        h.in_ns(w.up, "ip", "link", "set", f"tpnh{i}", "up")
        mac = json.loads(h.in_ns(w.gw, "ip", "-j", "link", "show", name).stdout)[0]["address"]
        # By MAC address: to NetworkManager, interface-name "*" means any link.
        w.nm.nmcli("connection", "add", "type", "ethernet", "ifname", "*", "ethernet.mac-address", mac,
                   "con-name", f"tpn-hostile{i}", "autoconnect", "no", "ipv4.method", "disabled",
                   "ipv6.method", "disabled")  # fmt: skip
    w.tproxyd.write_config(policies=POLICY)
    w.tproxyd.start()
    for i in range(len(HOSTILE)):
        w.nm.up(f"tpn-hostile{i}")
    _sets_hold(w, "the policy's links in the sets")

    h.in_ns(w.gw, "nft", "delete", "table", "inet", "tproxyd")
    _sets_hold(w, "the same names after the heal")
    w.core.direct(h.tcp_probe(w.gw))  # leaves by the fallback link, which no set names

    assert w.tproxyd.stop() == 0
    w.tproxyd.start()
    _sets_hold(w, "the same names after a restart")
    w.core.direct(h.tcp_probe(w.gw))
    assert sorted(w.tproxyd.active_links()) == sorted(HOSTILE)
