"""DNS the classic guide's way: a lan client's DNS, to whatever address it asks, answered by the
core's own `dns` section through tproxyd's DNS route, with real v2ray (run from the core config
tproxyd generates), real dnsmasq on the gateway, and resolvers inside the lab.

    tpe-cli --- tpe-gw (tproxyd, v2ray, dnsmasq on 10.77.0.1 / fd77::1) --- tpe-up --- tpe-srv
                  | tpe-gd                                                         poisoned 198.51.100.2 :53
                tpe-dns: poisoned 192.0.2.194 / 2001:db8:6::2 :53 (directly connected)   truthful 198.51.100.3 :53

Every resolver the client can reach is "poisoned" (answers POISONED); the "truthful" one (answers
TRUTHFUL) is named only in the core's dns section. dnsmasq, the gateway's resolver, forwards to
the directly connected poisoned one. So a truthful answer proves the query was answered by the core.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tproxy_service.config import load_config
from tproxy_service.proxycore.supervisor import render_checked

from . import harness as h
from .dnslab import POISONED, TRUTHFUL, ask, start_resolver, verdict

pytestmark = pytest.mark.root

RESOLVER_NS = "tpe-dns"
GW_DNS_LINK = "tpe-gd"
GW_ON_DNS = h.Addr("192.0.2.193", "2001:db8:6::1")
CONNECTED_RESOLVER = h.Addr("192.0.2.194", "2001:db8:6::2")  # on a subnet the gateway is on
FAR_RESOLVER = h.SERVER  # one hop behind the router
TRUTHFUL_RESOLVER = "198.51.100.3"  # in tpe-srv; only the core's dns section names it
CORE_PORT = 1014  # privileged; the lab's own v2ray keeps the default (1012), test_core.py's 1013
KINDS = [(proto, family) for proto in ("udp", "tcp") for family in (4, 6)]

# What the lan client hears from each resolver address, per dns_hijack.
DESTINATIONS = {"gateway": h.GW_LAN, "connected": CONNECTED_RESOLVER, "beyond-router": FAR_RESOLVER}
EXPECTED = {
    "all": {"gateway": TRUTHFUL, "connected": TRUTHFUL, "beyond-router": TRUTHFUL},
    "lan": {"gateway": POISONED, "connected": TRUTHFUL, "beyond-router": TRUTHFUL},
    # DNS is ordinary traffic: beyond the router it is proxied like any other, to where it was sent.
    "off": {"gateway": POISONED, "connected": POISONED, "beyond-router": POISONED},
}


@pytest.fixture(scope="module")
def resolvers(lab: h.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The resolvers, a link from the gateway to the connected one, and dnsmasq on the gateway."""
    workdir = tmp_path_factory.mktemp("dns")
    processes: list[subprocess.Popen[bytes]] = []
    truthful_cidr = f"{TRUTHFUL_RESOLVER}/25"
    try:
        h.new_namespace(RESOLVER_NS)
        h.add_veth(h.GW, GW_DNS_LINK, RESOLVER_NS, "tpe-d0")
        for family in (4, 6):
            plen = 27 if family == 4 else 64
            h.add_addr(h.GW, GW_DNS_LINK, f"{GW_ON_DNS.of(family)}/{plen}")
            h.add_addr(RESOLVER_NS, "tpe-d0", f"{CONNECTED_RESOLVER.of(family)}/{plen}")
        h.add_route(RESOLVER_NS, "default", GW_ON_DNS.v4)
        h.add_route(RESOLVER_NS, "::/0", GW_ON_DNS.v6)
        h.add_addr(h.SRV, "tpe-s0", truthful_cidr)
        connected = [CONNECTED_RESOLVER.v4, CONNECTED_RESOLVER.v6]
        processes.append(start_resolver(RESOLVER_NS, workdir / "connected.log", POISONED, connected))
        processes.append(start_resolver(h.SRV, workdir / "far.log", POISONED, [FAR_RESOLVER.v4, FAR_RESOLVER.v6]))
        processes.append(start_resolver(h.SRV, workdir / "truthful.log", TRUTHFUL, [TRUTHFUL_RESOLVER]))
        # The gateway's resolver, as a hotspot runs it: it serves the LAN and forwards upstream.
        dnsmasq = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                   "--bind-interfaces", f"--listen-address={h.GW_LAN.v4}", f"--listen-address={h.GW_LAN.v6}",
                   f"--server={CONNECTED_RESOLVER.v4}", "--cache-size=0", "--pid-file=", "--user=nobody",
                   "--group=nogroup", "--log-facility=-", "--log-queries"]  # fmt: skip
        processes.append(h.spawn(h.GW, dnsmasq, workdir / "dnsmasq.log"))
        h.wait_listening(h.GW, {(p, h.host_port(a, 53)) for a in (h.GW_LAN.v4, h.GW_LAN.v6) for p in ("tcp", "udp")},
                         "dnsmasq")  # fmt: skip
        yield workdir
    finally:
        for proc in reversed(processes):
            h.stop_process(proc)
        h.in_ns(h.SRV, "ip", "addr", "del", truthful_cidr, "dev", "tpe-s0", check=False)
        h.delete_namespace(RESOLVER_NS)  # takes tpe-gd with it


@dataclass
class DnsStack:
    daemon: h.Tproxyd
    access: h.AccessLog
    core_config: dict[str, object]


@pytest.fixture
def dns_stack(
    resolvers: Path, start_tproxyd: Callable[..., h.Tproxyd], tmp_path: Path
) -> Iterator[Callable[[str], DnsStack]]:
    """tproxyd with a dns_hijack mode, and v2ray run from the core config tproxyd makes of a user
    config whose dns section names the truthful resolver."""
    cores: list[subprocess.Popen[bytes]] = []

    def start(mode: str) -> DnsStack:
        user = tmp_path / "core-user.json"
        access = tmp_path / f"core-access-{mode}.log"
        user.write_text(
            json.dumps(
                {
                    "log": {"loglevel": "info", "access": str(access), "error": str(tmp_path / "core-error.log")},
                    "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
                    "dns": {"servers": [TRUTHFUL_RESOLVER]},
                }
            )
        )
        config = h.TproxydConfig(tmp_path / "conf", dns_hijack=mode, port=CORE_PORT, core_config=user)
        config.write()
        # What the supervisor writes to runtime_dir/core.json, checked by `v2ray -test` as there.
        text, warnings = asyncio.run(render_checked(load_config(config.path)))
        assert warnings == (), warnings
        core_json = tmp_path / f"core-{mode}.json"
        core_json.write_text(text)
        cores.append(h.spawn(h.GW, [h.V2RAY, "-config", str(core_json)], tmp_path / "core.out"))
        wanted = {(p, f"{a}:{CORE_PORT}") for p in ("tcp", "udp") for a in ("127.0.0.1", "[::1]")}
        h.wait_listening(h.GW, wanted, "the core")
        return DnsStack(start_tproxyd(config), h.AccessLog(access), json.loads(text))

    yield start
    for core in cores:
        h.stop_process(core)


def _answers(ns: str, source: h.Addr | None, destinations: dict[str, h.Addr]) -> dict[str, str]:
    found = {}
    for name, resolver in destinations.items():
        for proto, family in KINDS:
            src = source.of(family) if source else None
            found[f"{name} {proto} v{family}"] = verdict(ask(ns, resolver.of(family), family, proto, src), family)
    return found


@pytest.mark.parametrize("mode", ["all", "lan", "off"])
def test_lan_client_dns_per_dns_hijack(lab: h.Lab, dns_stack: Callable[[str], DnsStack], mode: str) -> None:
    stack = dns_stack(mode)
    with lab.leaks.no_client_packets():  # DNS beyond the router goes through the core in every mode
        found = _answers(h.CLI, h.CLIENT, DESTINATIONS)
    expected = {
        f"{name} {proto} v{family}": verdict(EXPECTED[mode][name].of(family), family)
        for name in DESTINATIONS
        for proto, family in KINDS
    }
    assert found == expected, f"dns_hijack = {mode!r}"
    # The truthful answers came through tproxyd's DNS route; what the core never saw was not
    # diverted: the gateway's dnsmasq or the resolver itself answered it.
    log = stack.access.text()
    for name, resolver in DESTINATIONS.items():
        for proto, family in KINDS:
            needle = f"accepted {proto}:{h.host_port(resolver.of(family), 53)}"
            if EXPECTED[mode][name] is TRUTHFUL:
                assert f"{needle} [tproxyd-dns]" in log, f"{name}: no {needle} [tproxyd-dns] in the access log"
            elif not (mode == "off" and name == "beyond-router"):
                assert needle not in log, f"{name}: {needle} went through the core"


@pytest.mark.parametrize("mode", ["all", "off"])
def test_gateway_itself_keeps_its_resolver_and_its_host_link_dns_never_loops(
    dns_stack: Callable[[str], DnsStack], mode: str
) -> None:
    """The gateway's own DNS to its dnsmasq stays local (poisoned here, by construction); its DNS
    leaving via the host link goes to the core, whose own queries (to the truthful resolver,
    via the same host link) carry the core mark: were they diverted again, they would loop into
    the DNS route and never be answered."""
    stack = dns_stack(mode)
    own = _answers(h.GW, None, {"own-resolver": h.GW_LAN})
    assert set(own.values()) == {"poisoned"}, own
    far = _answers(h.GW, h.GW_UP, {"beyond-router": FAR_RESOLVER})
    assert set(far.values()) == {"truthful" if mode != "off" else "poisoned"}, far
    # Query types other than A/AAAA: the dns outbound forwards them to where they were sent, on
    # its own connection, which carries the core mark too (unmarked, it would come straight back).
    for proto, family in KINDS:
        txt = ask(h.GW, FAR_RESOLVER.of(family), family, proto, h.GW_UP.of(family), qtype="TXT")
        assert txt == "poisoned", f"TXT {proto} v{family}: {txt!r}"
        if mode != "off":
            needle = f"accepted {proto}:{h.host_port(FAR_RESOLVER.of(family), 53)} [tproxyd-dns]"
            h.wait_until(lambda n=needle: n in stack.access.text(), 5, f"{needle!r} in the access log")
    assert ("tproxyd-dns" in json.dumps(stack.core_config["outbounds"])) == (mode != "off")
