"""End-to-end harness: namespaces, servers, v2ray, traffic probes and the running daemon.

Topology (every namespace and link name starts with `tpe-`):

    tpe-cli --- tpe-gw (tproxyd + v2ray) --- tpe-up (router, resolver) --- tpe-srv (servers)
    10.77.0/24   tpe-gc | tpe-gu              203.0.113/24                  198.51.100.0/25
    fd77::/64                                 2001:db8:1::/64               2001:db8:2::/64

The "internet" uses documentation prefixes, which `[bypass] reserved` does not cover. The
server sits one hop behind the router because the gateway's directly connected subnets are
bypassed by design.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Shared with the other tiers; re-exported, since tests/nm, the demo and the benchmarks use them
# as attributes of this module.
from tests.support import foreign_tables
from tests.support import main_namespace_snapshot as main_namespace_snapshot
from tests.support import netns_list as netns_list
from tests.support import run as run
from tests.support import stop_process as stop_process
from tests.support import wait_until as wait_until
from tests.tproxyd_config import render_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TPROXYD = REPO / ".venv" / "bin" / "tproxyd"
PYTHON = sys.executable
V2RAY = "/usr/bin/v2ray"

CLI, GW, UP, SRV = "tpe-cli", "tpe-gw", "tpe-up", "tpe-srv"
LATE_CLI = "tpe-cli2"  # created by a test, after the daemon is ready
NAMESPACES = (CLI, GW, UP, SRV)

LAN_LINK = "tpe-gc"  # gateway side of the client LAN
UP_LINK = "tpe-gu"  # gateway side of the upstream link
LATE_LINK = "tpe-gl"  # gateway side of the late client LAN (absent at daemon start)

TPROXY_PORT = 1012  # tproxyd's default [tproxy] port (privileged: see the config's checks)
MARKER_PORT = 12399  # plain (non-tproxy) v2ray inbound: lets tests order the access log
FWMARK = 1
CORE_MARK = 255
ROUTE_TABLE = 100
RULE_PRIORITY = 10100
HTTP_PORT = 8080
UDP_PORT = 5300
DNS_PORT = 53


@dataclass(frozen=True)
class Addr:
    v4: str
    v6: str

    def of(self, family: int) -> str:
        return self.v4 if family == 4 else self.v6


CLIENT = Addr("10.77.0.2", "fd77::2")
GW_LAN = Addr("10.77.0.1", "fd77::1")
GW_UP = Addr("203.0.113.1", "2001:db8:1::1")
ROUTER = Addr("203.0.113.2", "2001:db8:1::2")  # directly connected to the gateway
ROUTER_PRIVATE = Addr("192.168.77.2", "fd66::2")  # "home router" resolver: reserved AND local
GW_PRIVATE = Addr("192.168.77.1", "fd66::1")
SERVER = Addr("198.51.100.2", "2001:db8:2::2")  # proxied destination
SERVER_USER_CIDR = Addr("198.51.100.130", "2001:db8:4::10")  # in [bypass] cidrs
SERVER_LIST_FILE = Addr("192.0.2.70", "2001:db8:3::10")  # in a [bypass] files list
SERVER_RESERVED = Addr("172.16.9.10", "fd99::10")  # reserved ranges
LATE_CLIENT = Addr("10.78.0.2", "fd78::2")
GW_LATE = Addr("10.78.0.1", "fd78::1")
# A subnet the router already has and the gateway gains at test time (local-subnet tracking).
ROUTER_LATE_SUBNET = Addr("192.0.2.130", "2001:db8:5::2")
GW_LATE_SUBNET = Addr("192.0.2.129/26", "2001:db8:5::1/64")

USER_CIDRS = ("198.51.100.128/25", "2001:db8:4::/64")
LIST_FILE_CIDRS = ("192.0.2.64/26", "2001:db8:3::/48")

# Source ports the probes bind explicitly. The kernel's ephemeral range (v2ray's outbound
# sockets) starts at 32768, so an upstream packet with one of these source ports is the
# client's original packet, not the proxy's.
_source_ports = itertools.count(20000)


def next_source_port() -> int:
    port = next(_source_ports)
    assert port < 30000, "ran out of probe source ports"
    return port


# --- processes and waiting ------------------------------------------------------------------------


def in_ns(
    ns: str, *args: str, check: bool = True, timeout: float = 30, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *args, check=check, timeout=timeout, stdin=stdin)


def spawn(ns: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process in `ns`; `ip netns exec` execs, so the PID is the program's."""
    with log.open("ab") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=None if env is None else {**os.environ, **env},
        )


def listening(ns: str) -> set[tuple[str, str]]:
    """(proto, local address:port) of the listening sockets in `ns`, e.g. ("tcp", "[::1]:1012")."""
    out = in_ns(ns, "ss", "-Hlntu").stdout
    found = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 5:
            found.add((cols[0], cols[4]))
    return found


def wait_listening(ns: str, wanted: set[tuple[str, str]], what: str, timeout: float = 10) -> None:
    wait_until(lambda: wanted <= listening(ns), timeout, f"{what} listening on {sorted(wanted)} in {ns}")


# --- topology -----------------------------------------------------------------------------------


def add_veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    run("ip", "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)
    in_ns(ns_a, "ip", "link", "set", name_a, "up")
    in_ns(ns_b, "ip", "link", "set", name_b, "up")


def add_addr(ns: str, dev: str, cidr: str) -> None:
    extra = ["nodad"] if ":" in cidr else []
    in_ns(ns, "ip", "addr", "add", cidr, "dev", dev, *extra)


def add_route(ns: str, dst: str, via: str) -> None:
    in_ns(ns, "ip", "-6" if ":" in dst else "-4", "route", "add", dst, "via", via)


def enable_forwarding(ns: str) -> None:
    in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")


def new_namespace(name: str) -> None:
    run("ip", "netns", "add", name)
    in_ns(name, "ip", "link", "set", "lo", "up")


def delete_namespace(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


@dataclass(frozen=True)
class Network:
    """A small routed network of namespaces: veth pairs with an address on each end (ns, ifname,
    cidr, peer ns, peer ifname, peer cidr), routes (ns, destination, gateway), the namespaces
    that forward, and more addresses (ns, ifname, cidr)."""

    namespaces: tuple[str, ...]
    veths: tuple[tuple[str, str, str, str, str, str], ...]
    routes: tuple[tuple[str, str, str], ...]
    forwarding: tuple[str, ...]
    addresses: tuple[tuple[str, str, str], ...] = ()

    def build(self) -> None:
        """Create it; routes come after the addresses their gateways are reached by."""
        for ns in self.namespaces:
            new_namespace(ns)
        for ns, ifname, cidr, peer_ns, peer_ifname, peer_cidr in self.veths:
            add_veth(ns, ifname, peer_ns, peer_ifname)
            add_addr(ns, ifname, cidr)
            add_addr(peer_ns, peer_ifname, peer_cidr)
        for address in self.addresses:
            add_addr(*address)
        for route in self.routes:
            add_route(*route)
        for ns in self.forwarding:
            enable_forwarding(ns)


def add_client_lan(client_ns: str, client_link: str, client: Addr, gw_link: str, gw: Addr) -> None:
    """A client LAN on the gateway: a veth from `client_ns` to the gateway's `gw_link`, a /24 and
    a /64 on each end, the client's default routes via the gateway."""
    add_veth(client_ns, client_link, GW, gw_link)
    add_addr(client_ns, client_link, f"{client.v4}/24")
    add_addr(client_ns, client_link, f"{client.v6}/64")
    add_route(client_ns, "default", gw.v4)
    add_route(client_ns, "::/0", gw.v6)
    add_addr(GW, gw_link, f"{gw.v4}/24")
    add_addr(GW, gw_link, f"{gw.v6}/64")


def build_topology() -> None:
    for ns in NAMESPACES:
        new_namespace(ns)
    add_client_lan(CLI, "tpe-c0", CLIENT, LAN_LINK, GW_LAN)
    add_veth(GW, UP_LINK, UP, "tpe-u0")
    add_veth(UP, "tpe-u1", SRV, "tpe-s0")

    for cidr in (f"{GW_UP.v4}/24", f"{GW_UP.v6}/64", f"{GW_PRIVATE.v4}/24", f"{GW_PRIVATE.v6}/64"):
        add_addr(GW, UP_LINK, cidr)
    add_route(GW, "default", ROUTER.v4)
    add_route(GW, "::/0", ROUTER.v6)
    enable_forwarding(GW)

    for cidr in (
        f"{ROUTER.v4}/24",
        f"{ROUTER.v6}/64",
        f"{ROUTER_PRIVATE.v4}/24",
        f"{ROUTER_PRIVATE.v6}/64",
        f"{ROUTER_LATE_SUBNET.v4}/26",
        f"{ROUTER_LATE_SUBNET.v6}/64",
    ):
        add_addr(UP, "tpe-u0", cidr)
    add_addr(UP, "tpe-u1", "198.51.100.1/25")
    add_addr(UP, "tpe-u1", "2001:db8:2::1/64")
    for dst in ("10.77.0.0/24", "10.78.0.0/24"):
        add_route(UP, dst, GW_UP.v4)
    for dst in ("fd77::/64", "fd78::/64"):
        add_route(UP, dst, GW_UP.v6)
    for extra in (SERVER_USER_CIDR, SERVER_LIST_FILE, SERVER_RESERVED):
        add_route(UP, f"{extra.v4}/32", SERVER.v4)
        add_route(UP, f"{extra.v6}/128", SERVER.v6)
    enable_forwarding(UP)

    add_addr(SRV, "tpe-s0", f"{SERVER.v4}/25")
    add_addr(SRV, "tpe-s0", f"{SERVER.v6}/64")
    for extra in (SERVER_USER_CIDR, SERVER_LIST_FILE, SERVER_RESERVED):
        add_addr(SRV, "lo", f"{extra.v4}/32")
        add_addr(SRV, "lo", f"{extra.v6}/128")
    add_route(SRV, "default", "198.51.100.1")
    add_route(SRV, "::/0", "2001:db8:2::1")


def server_addresses(ns: str) -> list[str]:
    """Global addresses in `ns`: the UDP echo binds each one (replies leave from it)."""
    out = in_ns(ns, "ip", "-j", "addr", "show").stdout
    return [
        a["local"]
        for link in json.loads(out)
        for a in link.get("addr_info", [])
        if a.get("scope") in ("global", "host") and a["local"] not in ("127.0.0.1", "::1")
    ]


def start_peer_server(ns: str, log: Path, tcp: tuple[int, ...], udp: tuple[int, ...]) -> subprocess.Popen[bytes]:
    addrs = server_addresses(ns)
    args = [PYTHON, str(HERE / "peer_server.py")]
    args += [x for p in tcp for x in ("--tcp", str(p))]
    args += [x for p in udp for x in ("--udp", str(p))]
    args += [x for a in addrs for x in ("--addr", a)]
    proc = spawn(ns, args, log)
    wanted = {("tcp", f"*:{p}") for p in tcp} | {
        ("udp", f"[{a}]:{p}" if ":" in a else f"{a}:{p}") for a in addrs for p in udp
    }
    wait_listening(ns, wanted, f"peer server in {ns}")
    return proc


def new_late_client() -> None:
    """A second client LAN whose gateway link appears only now (config names it in advance)."""
    new_namespace(LATE_CLI)
    add_client_lan(LATE_CLI, "tpe-l0", LATE_CLIENT, LATE_LINK, GW_LATE)


# --- v2ray --------------------------------------------------------------------------------------


def v2ray_config(access_log: Path, error_log: Path) -> dict[str, object]:
    def tproxy_inbound(tag: str, listen: str) -> dict[str, object]:
        return {
            "tag": tag,
            "listen": listen,
            "port": TPROXY_PORT,
            "protocol": "dokodemo-door",
            "settings": {"network": "tcp,udp", "followRedirect": True},
            "streamSettings": {"sockopt": {"tproxy": "tproxy"}},
        }

    return {
        "log": {"loglevel": "info", "access": str(access_log), "error": str(error_log)},
        "inbounds": [
            tproxy_inbound("tproxy4", "127.0.0.1"),
            tproxy_inbound("tproxy6", "::1"),
            {  # see AccessLog.assert_no_flow
                "tag": "marker",
                "listen": "127.0.0.1",
                "port": MARKER_PORT,
                "protocol": "dokodemo-door",
                "settings": {"network": "tcp", "address": SERVER.v4, "port": HTTP_PORT},
            },
        ],
        "outbounds": [
            {
                "tag": "direct",
                "protocol": "freedom",
                "settings": {},
                "streamSettings": {"sockopt": {"mark": CORE_MARK}},
            }
        ],
    }


def start_v2ray(workdir: Path) -> tuple[subprocess.Popen[bytes], AccessLog]:
    config = workdir / "v2ray.json"
    access = workdir / "v2ray-access.log"
    config.write_text(json.dumps(v2ray_config(access, workdir / "v2ray-error.log"), indent=2))
    run(V2RAY, "-test", "-config", str(config))
    # As root: the packaged binary's file capability drops ambient caps (docs/architecture.md, "The proxy core").
    proc = spawn(GW, [V2RAY, "-config", str(config)], workdir / "v2ray.out")
    wanted = {(proto, f"{host}:{TPROXY_PORT}") for proto in ("tcp", "udp") for host in ("127.0.0.1", "[::1]")} | {
        ("tcp", f"127.0.0.1:{MARKER_PORT}")
    }
    wait_listening(GW, wanted, "v2ray")
    return proc, AccessLog(access)


# --- traffic probes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """One request with a unique source port, and what the server said it saw."""

    ns: str
    proto: str  # "tcp" | "udp"
    src: str
    sport: int
    dst: str
    dport: int
    seen_peer: str
    seen_port: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.dst else 4


def host_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


_PEER = re.compile(r"peer=(\S+) port=(\d+)")


def _parse_peer(out: str, what: str) -> tuple[str, int]:
    m = _PEER.search(out)
    assert m, f"{what}: no peer line in reply: {out!r}"
    return m.group(1), int(m.group(2))


def http_get(ns: str, src: str, dst: str, port: int = HTTP_PORT) -> Flow:
    sport = next_source_port()
    url = f"http://{host_port(dst, port)}/"
    proc = in_ns(ns, "curl", "-sS", "-g", "-m", "5", "--interface", src, "--local-port", str(sport), url, check=False)
    what = f"tcp {host_port(src, sport)} -> {host_port(dst, port)} from {ns}"
    assert proc.returncode == 0, f"{what}: curl rc {proc.returncode}: {proc.stderr.strip()}"
    peer, peer_port = _parse_peer(proc.stdout, what)
    return Flow(ns, "tcp", src, sport, dst, port, peer, peer_port)


_UDP_ASK = """
import socket, sys
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, sport)); s.connect((dst, dport)); s.settimeout(4)
s.send(b"hello"); print(s.recv(2048).decode())
"""


def udp_ask(ns: str, src: str, dst: str, port: int = UDP_PORT) -> Flow:
    """One datagram and its echo. (A tiny Python client: socat lingers after stdin EOF.)"""
    sport = next_source_port()
    proc = in_ns(ns, PYTHON, "-c", _UDP_ASK, src, str(sport), dst, str(port), check=False)
    what = f"udp {host_port(src, sport)} -> {host_port(dst, port)} from {ns}"
    assert proc.returncode == 0, f"{what}: no reply: {proc.stderr.strip()[-300:]}"
    peer, peer_port = _parse_peer(proc.stdout, what)
    return Flow(ns, "udp", src, sport, dst, port, peer, peer_port)


def attempt(proto: str, ns: str, src: str, dst: str, device: str | None = None) -> Flow:
    """One request that may go unanswered (blocked): then its Flow's `seen_peer` is "".
    `device`: the socket is bound to it (SO_BINDTODEVICE, as `curl --interface DEV` does)."""
    sport = next_source_port()
    port = HTTP_PORT if proto == "tcp" else UDP_PORT
    args = [proto, src, str(sport), dst, str(port), device or ""]
    proc = in_ns(ns, PYTHON, "-c", _TRY, *args, check=False)
    if proc.returncode != 0:
        return Flow(ns, proto, src, sport, dst, port, "", 0)
    peer, peer_port = _parse_peer(proc.stdout, f"{proto} {host_port(src, sport)} -> {host_port(dst, port)}")
    return Flow(ns, proto, src, sport, dst, port, peer, peer_port)


_TRY = """
import socket, sys
proto, src, sport, dst, dport, device = sys.argv[1:]
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, kind)
if device:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
s.bind((src, int(sport))); s.settimeout(2); s.connect((dst, int(dport)))
s.send(b"GET / HTTP/1.0\\r\\n\\r\\n" if proto == "tcp" else b"hello")
reply = b""
while b"port=" not in reply or not reply.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    reply += chunk
print(reply.decode())
"""


def send(proto: str, ns: str, src: str, dst: str, port: int | None = None) -> Flow:
    if proto == "tcp":
        return http_get(ns, src, dst, port or HTTP_PORT)
    return udp_ask(ns, src, dst, port or UDP_PORT)


class AccessLog:
    """v2ray's access log: one line per accepted flow, e.g.
    `2024/01/01 00:00:00 10.77.0.2:20001 accepted tcp:198.51.100.2:8080 [tproxy4 -> direct]`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @staticmethod
    def needle(flow: Flow) -> str:
        return f"{host_port(flow.src, flow.sport)} accepted {flow.proto}:{host_port(flow.dst, flow.dport)}"

    def line_for(self, flow: Flow) -> str | None:
        needle = self.needle(flow)
        return next((line for line in self.text().splitlines() if needle in line), None)

    def wait_for_flow(self, flow: Flow, timeout: float = 5) -> str:
        return wait_until(lambda: self.line_for(flow), timeout, f"v2ray access-log line '{self.needle(flow)}'")

    def assert_no_flow(self, flow: Flow) -> None:
        """v2ray writes access lines in order through one queue, and it records a flow before
        forwarding any of its data. So once a later marker flow's line is in the log, a line
        for `flow` (already answered) would be there too if v2ray had handled it."""
        marker = http_get(GW, "127.0.0.1", "127.0.0.1", MARKER_PORT)
        needle = f"{host_port('127.0.0.1', marker.sport)} accepted tcp:"
        wait_until(lambda: needle in self.text(), 5, f"marker line '{needle}' in the access log")
        line = self.line_for(flow)
        assert line is None, f"flow went through v2ray but should be direct: {line}"


class LeakProbe:
    """An nft table in the router namespace that records every packet coming from a client LAN
    (a counter) and every (source, proto, source port) among the probes' fixed source ports."""

    RULESET = """
table inet tpe_probe {
    set seen4 { type ipv4_addr . inet_proto . inet_service; flags dynamic; size 65535; }
    set seen6 { type ipv6_addr . inet_proto . inet_service; flags dynamic; size 65535; }
    counter client_pkts {}
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        ip saddr { 10.77.0.0/24, 10.78.0.0/24 } counter name client_pkts
        ip6 saddr { fd77::/64, fd78::/64 } counter name client_pkts
        meta l4proto { tcp, udp } th sport 20000-29999 add @seen4 { ip saddr . meta l4proto . th sport }
        meta l4proto { tcp, udp } th sport 20000-29999 add @seen6 { ip6 saddr . meta l4proto . th sport }
    }
}
"""

    def __init__(self, ns: str = UP) -> None:
        self.ns = ns
        in_ns(ns, "nft", "-f", "-", stdin=self.RULESET)

    def client_packets(self) -> int:
        out = in_ns(self.ns, "nft", "-j", "list", "counter", "inet", "tpe_probe", "client_pkts").stdout
        return int(next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o))

    def saw(self, flow: Flow) -> bool:
        """Did any packet of the flow's original socket reach the router?"""
        set_name = "seen6" if flow.family == 6 else "seen4"
        elem = f"{{ {flow.src} . {flow.proto} . {flow.sport} }}"
        proc = in_ns(self.ns, "nft", "get", "element", "inet", "tpe_probe", set_name, elem, check=False)
        return proc.returncode == 0

    @contextlib.contextmanager
    def no_client_packets(self) -> Iterator[None]:
        before = self.client_packets()
        yield
        leaked = self.client_packets() - before
        assert leaked == 0, f"{leaked} packets with a client LAN source address reached the router"


@dataclass
class Proofs:
    """The two verdicts every datapath test uses."""

    access: AccessLog
    leaks: LeakProbe

    def proxied(self, flow: Flow, expected_peer: str) -> None:
        assert flow.seen_peer == expected_peer, (
            f"{flow.proto} {flow.src}:{flow.sport} -> {flow.dst}: server saw {flow.seen_peer}, "
            f"expected the gateway's address {expected_peer} (not proxied?)"
        )
        assert flow.seen_port != flow.sport, f"server saw the client's own source port {flow.sport}"
        self.access.wait_for_flow(flow)
        assert not self.leaks.saw(flow), f"the client's original packets reached the router: {flow}"

    def blocked(self, flow: Flow) -> None:
        """Unanswered, and not one packet of it reached the router."""
        assert flow.seen_peer == "", f"{flow.proto} {flow.src}:{flow.sport} -> {flow.dst} was answered: {flow}"
        assert not self.leaks.saw(flow), f"packets of a blocked flow reached the router: {flow}"

    def direct(self, flow: Flow) -> None:
        assert (flow.seen_peer, flow.seen_port) == (flow.src, flow.sport), (
            f"{flow.proto} {flow.src}:{flow.sport} -> {flow.dst}: server saw "
            f"{flow.seen_peer}:{flow.seen_port}, expected the client itself (direct)"
        )
        self.access.assert_no_flow(flow)


@dataclass
class Lab:
    """What the lab fixture built and the tests use."""

    workdir: Path
    access: AccessLog
    leaks: LeakProbe
    proofs: Proofs


# --- the daemon ---------------------------------------------------------------------------------


@dataclass
class TproxydConfig:
    workdir: Path
    links: dict[str, str] = field(default_factory=lambda: {LAN_LINK: "lan", UP_LINK: "host"})
    dns_hijack: str = "all"
    port: int = TPROXY_PORT
    core_config: Path | None = None  # [core] config: the user's v2ray JSON (for render_checked)
    failure_policy: str = "open"
    ipv6: bool = True
    udp: bool = True
    cidrs: tuple[str, ...] = USER_CIDRS
    list_file_cidrs: tuple[str, ...] = LIST_FILE_CIDRS

    @property
    def path(self) -> Path:
        return self.workdir / "tproxyd.toml"

    def render(self) -> str:
        list_file = self.workdir / "bypass-list.txt"
        list_file.write_text(
            "# bypass list used by the e2e tests\n" + "".join(f"{c}  # test entry\n" for c in self.list_file_cidrs)
        )
        return render_config(
            self.workdir,
            tproxy={
                "port": self.port,
                "mark": FWMARK,
                "core_mark": CORE_MARK,
                "route_table": ROUTE_TABLE,
                "rule_priority": RULE_PRIORITY,
                "ipv6": self.ipv6,
                "udp": self.udp,
                "dns_hijack": self.dns_hijack,
                "failure_policy": self.failure_policy,
            },
            bypass={"reserved": True, "local_subnets": True, "cidrs": list(self.cidrs), "files": [list_file]},
            # The lab runs its own v2ray; tproxyd treats it as always ready.
            core={"supervise": False, **({"config": self.core_config} if self.core_config else {})},
            links=self.links,
        )

    def write(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.render())
        os.replace(tmp, self.path)  # the daemon never reads a half-written file
        return self.path


class Tproxyd:
    """One tproxyd process in the gateway namespace; stderr goes to its own log file."""

    def __init__(self, config: TproxydConfig, log: Path, bus_address: str | None = None) -> None:
        self.config = config
        self.log = log
        config.write()
        # No system bus for the daemon under test unless a test gives it a private one: on a
        # machine that has one, it must neither take io.github.Tproxyd from a real service nor
        # fail because one owns it. Without a bus tproxyd runs on its config alone.
        bus = {"DBUS_SYSTEM_BUS_ADDRESS": bus_address or f"unix:path={config.workdir / 'no-system-bus'}"}
        self.proc = spawn(GW, [str(TPROXYD), "--config", str(config.path)], log, env=bus)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10, after: int = 0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and needle not in self.log_text()[after:]:
                raise AssertionError(f"tproxyd exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return needle in self.log_text()[after:]

        wait_until(seen, timeout, f"'{needle}' in tproxyd's log {self.log}")

    def wait_ready(self, timeout: float = 15) -> None:
        self.wait_log("tproxyd ready", timeout)
        wait_until(lambda: kernel_state(GW).complete, timeout, "tproxyd's table, rules and routes")

    def reload(self, config: TproxydConfig | None = None) -> None:
        """Rewrite the config (if given) and SIGHUP."""
        if config is not None:
            self.config = config
            config.write()
        self.proc.send_signal(signal.SIGHUP)

    def log_size(self) -> int:
        return len(self.log_text())

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


@dataclass(frozen=True)
class KernelState:
    """What of ours is in a namespace's kernel."""

    tables: tuple[str, ...]  # "inet tproxyd" etc., every table in the namespace
    table_listing: str | None  # `nft list table inet tproxyd`
    rules4: tuple[str, ...]  # `ip rule` lines with our fwmark and table
    rules6: tuple[str, ...]
    routes4: tuple[str, ...]  # `ip route show table 100`
    routes6: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return (
            self.table_listing is not None
            and all(f"chain {c} {{" in self.table_listing for c in ("prerouting", "proxy", "output"))
            and all(
                f"set {s} {{" in self.table_listing
                for s in ("lan_links", "host_links", "bypass4", "bypass6", "local4", "local6")
            )
            and len(self.rules4) == len(self.rules6) == 1
            and len(self.routes4) == len(self.routes6) == 1
        )

    @property
    def absent(self) -> bool:
        return self.table_listing is None and not (self.rules4 or self.rules6 or self.routes4 or self.routes6)


def _fwmark_rules(ns: str, family: str) -> tuple[str, ...]:
    out = in_ns(ns, "ip", family, "rule", "show").stdout
    return tuple(
        line.strip() for line in out.splitlines() if f"fwmark {FWMARK:#x}" in line and f"lookup {ROUTE_TABLE}" in line
    )


def _table_routes(ns: str, family: str) -> tuple[str, ...]:
    proc = in_ns(ns, "ip", family, "route", "show", "table", str(ROUTE_TABLE), check=False)
    return tuple(line.strip() for line in proc.stdout.splitlines() if line.strip())


def nft_tables(ns: str) -> tuple[str, ...]:
    out = in_ns(ns, "nft", "list", "tables").stdout
    return tuple(line.removeprefix("table ").strip() for line in out.splitlines() if line.strip())


def nft_table_listing(ns: str, family: str, name: str) -> str | None:
    proc = in_ns(ns, "nft", "list", "table", family, name, check=False)
    return proc.stdout if proc.returncode == 0 else None


def kernel_state(ns: str) -> KernelState:
    return KernelState(
        tables=nft_tables(ns),
        table_listing=nft_table_listing(ns, "inet", "tproxyd"),
        rules4=_fwmark_rules(ns, "-4"),
        rules6=_fwmark_rules(ns, "-6"),
        routes4=_table_routes(ns, "-4"),
        routes6=_table_routes(ns, "-6"),
    )


def set_has(ns: str, set_name: str, element: str) -> bool:
    proc = in_ns(ns, "nft", "get", "element", "inet", "tproxyd", set_name, f"{{ {element} }}", check=False)
    return proc.returncode == 0


def remove_our_kernel_state(ns: str) -> None:
    """Fixture cleanup after a daemon that could not clean up (crash, failed test)."""
    in_ns(ns, "nft", "delete", "table", "inet", "tproxyd", check=False)
    for family in ("-4", "-6"):
        while (
            in_ns(
                ns, "ip", family, "rule", "del", "fwmark", str(FWMARK), "lookup", str(ROUTE_TABLE), check=False
            ).returncode
            == 0
        ):
            pass
        in_ns(ns, "ip", family, "route", "flush", "table", str(ROUTE_TABLE), check=False)


# --- other people's tables (politeness) ----------------------------------------------------------

FOREIGN_TABLES = foreign_tables(UP_LINK)
FOREIGN = (("ip", "nat"), ("inet", "filter"))
_COUNTER_VALUES = re.compile(r"counter packets \d+ bytes \d+")


def strip_counters(listing: str | None) -> str | None:
    return None if listing is None else _COUNTER_VALUES.sub("counter", listing)


def foreign_listing(ns: str) -> dict[str, str | None]:
    """Listings of the foreign tables; counter values are stripped (traffic moves them)."""
    listing = {}
    for family, name in FOREIGN:
        text = nft_table_listing(ns, family, name)
        listing[f"{family} {name}"] = strip_counters(text)
    return listing


def install_foreign_tables(ns: str) -> None:
    for family, name in FOREIGN:
        in_ns(ns, "nft", "delete", "table", family, name, check=False)
    in_ns(ns, "nft", "-f", "-", stdin=FOREIGN_TABLES)
