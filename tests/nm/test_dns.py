"""A NetworkManager hotspot's clients get their DNS answered by the core: the shared connection's
own dnsmasq hands itself out (DHCP) as the clients' resolver and forwards to the gateway's upstream
resolver, which here is "poisoned"; with the hotspot proxied (dns_hijack "all", the default) the
client's queries to that dnsmasq are answered by the core's dns section (the "truthful" resolver).
The core runs the config tproxyd generates from a user config naming the truthful resolver."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.e2e.dnslab import POISONED, TRUTHFUL, ask, start_resolver
from tests.e2e.harness import stop_process
from tproxy_service.config import load_config
from tproxy_service.proxycore.supervisor import render_checked

from . import harness as h

pytestmark = pytest.mark.root

UPSTREAM_RESOLVER = "198.51.100.53"  # poisoned; the gateway's resolv.conf names it
TRUTHFUL_RESOLVER = "198.51.100.3"  # only the core's dns section names it
CLIENT_LINK = "tpnc0"

# udhcpc's hook (instead of its default script, which would write the machine's /etc/resolv.conf):
# configure the lease and note the DNS server the hotspot offered.
DHCP_HOOK = """#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    ip route replace default via "$router"
    echo "$dns" > "{dns_file}"
    ;;
esac
"""


def take_dhcp_lease(w: h.World) -> str:
    """The client drops its static address and takes one from the hotspot; returns its DNS server."""
    hook, dns_file = w.workdir / "udhcpc-hook", w.workdir / "client-dns"
    hook.write_text(DHCP_HOOK.format(dns_file=dns_file))
    hook.chmod(0o755)
    h.in_ns(w.cli, "ip", "addr", "flush", "dev", CLIENT_LINK)
    proc = h.in_ns(w.cli, "udhcpc", "-i", CLIENT_LINK, "-f", "-q", "-n", "-t", "10", "-T", "2", "-s", str(hook),
                   check=False, timeout=60)  # fmt: skip
    assert proc.returncode == 0, f"udhcpc: no lease from the hotspot:\n{proc.stdout}{proc.stderr}"
    return dns_file.read_text().split()[0]


def test_hotspot_client_dns_is_answered_by_the_core(nm_world: h.World) -> None:
    w = nm_world
    resolvers: list[subprocess.Popen[bytes]] = []
    try:
        for address in (UPSTREAM_RESOLVER, TRUTHFUL_RESOLVER):
            h.in_ns(w.up, "ip", "addr", "add", f"{address}/32", "dev", "lo")
        resolvers.append(start_resolver(w.up, w.workdir / "upstream.log", POISONED, [UPSTREAM_RESOLVER]))
        resolvers.append(start_resolver(w.up, w.workdir / "truthful.log", TRUTHFUL, [TRUTHFUL_RESOLVER]))
        # The gateway's upstream resolver, which the hotspot's dnsmasq forwards to (same inode:
        # the file is bind-mounted over the sandbox's /etc/resolv.conf).
        (w.sandbox.dir / "resolv.conf").write_text(f"nameserver {UPSTREAM_RESOLVER}\n")

        access = w.workdir / "core-access.log"
        user = w.workdir / "core-user.json"
        user.write_text(json.dumps({
            "log": {"loglevel": "info", "access": str(access)},
            "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
            "dns": {"servers": [TRUTHFUL_RESOLVER]},
        }))  # fmt: skip
        w.tproxyd.write_config(core_config=user)  # dns_hijack: the default ("all")
        text, _warnings = asyncio.run(render_checked(load_config(w.tproxyd.config)))
        assert w.core is not None
        w.core.stop()
        w.core = h.Core(w.gw, w.workdir, generated=text)

        w.tproxyd.start()
        w.nm.up(h.HOTSPOT)
        h.wait_until(lambda: h.set_elements(w.gw, "lan_links") == {h.HOT_LINK}, 10, "the hotspot proxied as lan")
        dns = take_dhcp_lease(w)  # DHCP on a proxied hotspot link still works: it is not port 53
        assert dns == h.HOTSPOT_GW, f"the hotspot offered {dns} as resolver, expected its own dnsmasq"
        for proto in ("udp", "tcp"):
            assert ask(w.cli, dns, 4, proto) == TRUTHFUL.v4, f"{proto}: the hotspot client's DNS was not the core's"
            needle = f"accepted {proto}:{dns}:53 [tproxyd-dns]"
            h.wait_until(lambda n=needle: n in access.read_text(), 5, f"{needle!r} in the core's access log")

        # Control: with the hotspot not proxied the same query gets the gateway's upstream answer.
        assert w.bus.tproxyd("DisableLink", "s", [h.HOT_LINK]).error is None
        h.wait_until(lambda: h.set_elements(w.gw, "lan_links") == set(), 10, "the hotspot released")
        assert ask(w.cli, dns, 4, "udp") == POISONED.v4, "the hotspot's dnsmasq should answer from upstream"
    finally:
        for proc in resolvers:
            stop_process(proc)
