"""Data plane: iperf3 throughput of a bypassed flow through the gateway, 100k ruleset vs none.

Three fresh namespaces: client -> gateway -> server.
  client  c0  198.51.100.2/24, default via 198.51.100.1
  gateway lan0 198.51.100.1/24 (tproxyd link, `lan` mode), wan0 10.92.0.1/24, forwarding on,
          203.0.113.0/24 and 192.0.2.0/24 via 10.92.0.2
  server  s0  10.92.0.2/24, default via 10.92.0.1; 203.0.113.10/32 and 192.0.2.10/32 on lo
The server sits one hop behind the gateway, so it is not a directly connected subnet: the flow to
203.0.113.10 is bypassed only because 203.0.113.0/24 is in the bypass list file (100k random IPv4
/24s + 2k IPv6 /48s + that line), i.e. it walks prerouting -> proxy -> bypass and matches in the
100k-element `bypass4` set. Conditions, in a rotating order each repeat:
  * none:      no tproxyd, no table in the gateway (the baseline);
  * loaded:    tproxyd running in the gateway with that config (started/stopped per run);
  * guide:     the classic v2ray TPROXY guide's hand-written IPv4 ruleset (the second baseline),
               with the same reserved ranges + list as its `return` set, and its policy routing;
  * conntrack: diagnostic, a one-rule table of ours (`ct state new`) that only turns conntrack on;
  * small:     diagnostic, tproxyd with a bypass list holding only 203.0.113.0/24.
Control: before each run a TCP connection to a listener on 192.0.2.10 (not bypassed) must succeed
with no ruleset and fail with the table loaded (no core listens, so diverted traffic cannot reach
the server): proof that the ruleset is in the path of the measured flow's packets.

Run as root: .venv/bin/python bench/dataplane.py [--repeat 5] [--seconds 5] [--bypass 100000] [--no-diagnostics]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchlib import (
    ROOT,
    Daemon,
    Goal,
    Report,
    bench_main,
    bench_parser,
    bypass_lines,
    in_ns,
    log,
    netns,
    sh,
    write_config,
)
from footprint import Variant
from render import dataplane as render_dataplane

from tproxy_service.cidrs import to_address
from tproxy_service.desired import RESERVED

SERVER = "203.0.113.10"
CONTROL = "192.0.2.10"
CONTROL_PORT = 5202
NONE, LOADED, GUIDE, CONNTRACK, SMALL = "none", "loaded", "guide", "conntrack", "small"
LOADED_BASELINE = "loaded_baseline"  # the same config, run by the --baseline tree's code
RESULTS = ROOT / "bench" / "results" / "dataplane.json"
# The hand-written IPv4 ruleset of the classic v2ray TPROXY guide, given the same bypass set as
# tproxyd (reserved ranges + the list) as its `return` set; its LAN (192.168.0.0/16 in the guide)
# is this topology's client subnet.
GUIDE_RULESET = """\
table ip tpbguide {{
    set bypass {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {elements} }} }}
    chain prerouting {{
        type filter hook prerouting priority filter; policy accept;
        ip daddr @bypass return
        ip daddr 198.51.100.0/24 tcp dport != 53 return
        meta l4proto {{ tcp, udp }} meta mark set 1 tproxy to 127.0.0.1:12345 accept
    }}
    chain divert {{
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto tcp socket transparent 1 meta mark set 1 accept
    }}
}}
"""
CONNTRACK_TABLE = (
    "add table inet tpbct; add chain inet tpbct pre { type filter hook prerouting priority -150; }; "
    "add rule inet tpbct pre ct state new"
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser(
        __doc__,
        ("--repeat", 5, "iperf3 runs per condition"),
        ("--seconds", 5, "iperf3 -t, of which the first second is omitted"),
        ("--bypass", 100_000, "IPv4 /24s in the bypass file"),
        ("--json", RESULTS, "raw results"),
    )
    parser.add_argument(
        "--no-diagnostics",
        dest="diagnostics",
        action="store_false",
        help="skip the conntrack-only and small-table conditions",
    )
    parser.add_argument("--baseline", type=Path, help="also run tproxyd from this tree's tproxy_service")
    return parser.parse_args(argv)


def build_topology(client: str, gateway: str, server: str) -> None:
    sh("ip", "-n", gateway, "link", "add", "lan0", "type", "veth", "peer", "name", "c0", "netns", client)
    sh("ip", "-n", gateway, "link", "add", "wan0", "type", "veth", "peer", "name", "s0", "netns", server)
    steps = [
        (client, ["addr", "add", "198.51.100.2/24", "dev", "c0"]),
        (client, ["link", "set", "c0", "up"]),
        (client, ["route", "add", "default", "via", "198.51.100.1"]),
        (gateway, ["addr", "add", "198.51.100.1/24", "dev", "lan0"]),
        (gateway, ["addr", "add", "10.92.0.1/24", "dev", "wan0"]),
        (gateway, ["link", "set", "lan0", "up"]),
        (gateway, ["link", "set", "wan0", "up"]),
        (gateway, ["route", "add", "203.0.113.0/24", "via", "10.92.0.2"]),
        (gateway, ["route", "add", "192.0.2.0/24", "via", "10.92.0.2"]),
        (server, ["addr", "add", "10.92.0.2/24", "dev", "s0"]),
        (server, ["addr", "add", f"{SERVER}/32", "dev", "lo"]),
        (server, ["addr", "add", f"{CONTROL}/32", "dev", "lo"]),
        (server, ["link", "set", "s0", "up"]),
        (server, ["route", "add", "default", "via", "10.92.0.1"]),
    ]
    for ns, argv in steps:
        sh("ip", "-n", ns, *argv)
    in_ns(gateway, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    in_ns(client, "ping", "-c", "1", "-W", "2", SERVER)


@contextmanager
def server_process(ns: str, argv: list[str], port: int) -> Iterator[None]:
    """A process in `ns` listening on TCP `port`; terminated on exit."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while f":{port} " not in in_ns(ns, "ss", "-ltnH"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} did not start listening on port {port}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def control_listener() -> list[str]:
    code = (
        "import socket\n"
        f"s = socket.create_server(('{CONTROL}', {CONTROL_PORT}))\n"
        "while True:\n"
        "    s.accept()[0].close()\n"
    )
    return [sys.executable, "-c", code]


def iperf_gbits(client: str, seconds: int) -> float:
    out = in_ns(client, "iperf3", "-c", SERVER, "-t", str(seconds), "-O", "1", "-J")
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def control_connects(client: str) -> bool:
    """True if a TCP connection to the non-bypassed control address succeeds."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(('{CONTROL}', {CONTROL_PORT}), timeout=2).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return subprocess.run(["ip", "netns", "exec", client, sys.executable, "-c", code]).returncode == 0


@contextmanager
def condition(name: str, gateway: str, configs: dict[str, Path], guide: Path, baseline: Path | None) -> Iterator[None]:
    """Put the gateway in condition `name` for the duration of the block."""
    if "tproxyd" in in_ns(gateway, "nft", "list", "tables"):
        raise RuntimeError("table inet tproxyd is still loaded in the gateway")
    if name in configs:
        daemon: Daemon = Daemon(gateway, configs[name])
        if name == LOADED_BASELINE:
            daemon = Variant(gateway, configs[name], baseline)
        try:
            daemon.start()
            yield
        finally:
            daemon.stop()
    elif name == GUIDE:  # with the guide's policy routing: marked packets are delivered locally
        in_ns(gateway, "nft", "-f", str(guide))
        in_ns(gateway, "ip", "rule", "add", "fwmark", "1", "lookup", "100")
        in_ns(gateway, "ip", "route", "add", "local", "default", "dev", "lo", "table", "100")
        try:
            yield
        finally:
            in_ns(gateway, "ip", "route", "del", "local", "default", "dev", "lo", "table", "100")
            in_ns(gateway, "ip", "rule", "del", "fwmark", "1", "lookup", "100")
            in_ns(gateway, "nft", "delete table ip tpbguide")
    elif name == CONNTRACK:
        in_ns(gateway, "nft", CONNTRACK_TABLE)
        try:
            yield
        finally:
            in_ns(gateway, "nft", "delete table inet tpbct")
    else:
        yield


def measure(args: argparse.Namespace, tmp: Path, client: str, gateway: str) -> dict[str, list[float]]:
    configs = {}
    for name, count in ((LOADED, args.bypass), (SMALL, 0)):
        bypass = tmp / f"bypass-{count}.txt"
        bypass.write_text("\n".join(bypass_lines(count, 2000 if count else 0, extra=["203.0.113.0/24"])) + "\n")
        configs[name] = tmp / f"config-{count}.toml"
        write_config(configs[name], bypass, {"lan0": "lan"})
    guide = tmp / "guide.nft"
    v4 = [line for line in bypass_lines(args.bypass, 0, extra=["203.0.113.0/24"]) if line[:1].isdigit()]
    reserved = [f"{to_address(4, iv.first)}-{to_address(4, iv.last)}" for iv in RESERVED.v4]
    guide.write_text(GUIDE_RULESET.format(elements=", ".join(reserved + v4)))
    if args.baseline:
        configs[LOADED_BASELINE] = configs[LOADED]
    names = [NONE, LOADED, GUIDE] + ([LOADED_BASELINE] if args.baseline else [])
    names += [CONNTRACK, SMALL] if args.diagnostics else []
    results: dict[str, list[float]] = {name: [] for name in names}
    controls: list[bool] = []  # True when the control behaved as its condition requires
    for i in range(args.repeat):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            with condition(name, gateway, configs, guide, args.baseline):
                diverted = name in configs or name == GUIDE
                controls.append(control_connects(client) != diverted)
                results[name].append(iperf_gbits(client, args.seconds))
            log(f"dataplane: run {i + 1}/{args.repeat} {name}: {results[name][-1]:.2f} Gbit/s")
    results["controls_ok"] = [float(all(controls))]
    return results


def run(args: argparse.Namespace) -> Report:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tpb-dp-")))
        client = stack.enter_context(netns("dpcli"))
        gateway = stack.enter_context(netns("dpgw"))
        server = stack.enter_context(netns("dpsrv"))
        build_topology(client, gateway, server)
        stack.enter_context(server_process(server, ["iperf3", "-s", "-B", SERVER], 5201))
        stack.enter_context(server_process(server, control_listener(), CONTROL_PORT))
        log(f"dataplane: {args.repeat} x {args.seconds} s per condition, {args.bypass} bypass CIDRs")
        results = measure(args, tmp, client, gateway)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "dataplane", "bypass": args.bypass, **results}, indent=1) + "\n")
    return render(results, args)


def render(results: dict[str, list[float]], args: argparse.Namespace) -> Report:
    """The tables come from bench/render.py (the one renderer); the narrative is in BENCHMARKS.md."""
    text, goals = render_dataplane({"bypass": args.bypass, **results})
    return Report("Data plane: bypassed flow", text, [Goal(*g) for g in goals])


def main(argv: Sequence[str]) -> int:
    return bench_main(argv, parse_args, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
