"""Reaction: an address added on a link -> its subnet is in set `local4` (and back on removal).

In a fresh namespace: a veth pair (lan0, configured `lan`; lanp0, its peer), tproxyd running with
a bypass list file of 100k IPv4 /24s + 2k IPv6 /48s. A worker inside the namespace listens on the
nf_tables multicast group (NFNLGRP_NFTABLES) and, `--cycles` times:
  * takes t0 = perf_counter() right before sending RTM_NEWADDR 198.51.100.1/24 dev lan0 (a raw
    rtnetlink socket, so no library work sits between t0 and the syscall), then waits for the
    NEWSETELEM event on set `local4` carrying key 198.51.100.0: the moment the kernel committed it;
  * the same for RTM_DELADDR -> DELSETELEM.
Anchors (their reaction models, not measured here): sing-box debounces network changes 1 s;
v2rayA polls every 3 s (uniform 0-3 s delay, median 1.5 s).

Raw samples: bench/results/reaction.json; bench/render.py makes the tables.
Run as root: .venv/bin/python bench/reaction.py [--cycles 50] [--bypass 100000]
"""

from __future__ import annotations

import argparse
import random
import select
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    Daemon,
    Report,
    bench_main,
    bench_parser,
    bypass_lines,
    log,
    netns,
    run_worker,
    save_results,
    sh,
    write_config,
)

from tproxy_service.kernel.netlink_wire import NLMSG_ERROR, NLMSGHDR, attr, iter_attrs, messages, parse_attrs

LINK = "lan0"
PEER = "lanp0"
ADDRESS = "198.51.100.1"
PREFIX = 24
SET_NAME = b"local4\0"

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
NFT_NEWSETELEM = (10 << 8) | 12
NFT_DELSETELEM = (10 << 8) | 14
NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE = 1, 1, 1


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return bench_parser(
        __doc__,
        ("--cycles", 50, "address add/remove cycles"),
        ("--bypass", 100_000, "IPv4 /24s in the bypass file"),
    ).parse_args(argv)


# --- netlink helpers (worker) -------------------------------------------------------------------


def element_keys(elements: bytes) -> list[bytes]:
    keys = []
    for kind, elem in iter_attrs(elements, 0, len(elements)):
        if kind != NFTA_LIST_ELEM:
            continue
        for key_kind, key in iter_attrs(elem, 0, len(elem)):
            if key_kind == NFTA_SET_ELEM_KEY:
                keys += [value for vk, value in iter_attrs(key, 0, len(key)) if vk == NFTA_DATA_VALUE]
    return keys


def carries(buf: bytes, msg_type: int, key: bytes) -> bool:
    """True if `buf` holds a `msg_type` message for set local4 with element key `key`."""
    for msg in messages(buf):
        if msg.kind == msg_type:
            found = parse_attrs(buf, msg.start + 4, msg.end)
            if found.get(NFTA_SET_ELEM_LIST_SET) == SET_NAME and key in element_keys(
                found.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
            ):
                return True
    return False


def nft_events() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    return sock


def addr_message(msg_type: int, index: int, seq: int) -> bytes:
    packed = socket.inet_aton(ADDRESS)
    body = struct.pack("=BBBBI", socket.AF_INET, PREFIX, 0, 0, index)
    for kind in (IFA_LOCAL, IFA_ADDRESS):
        body += attr(kind, packed)
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if msg_type == RTM_NEWADDR else 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def check_ack(sock: socket.socket) -> None:
    for msg in messages(sock.recv(65536)):
        if msg.kind == NLMSG_ERROR and msg.error_code():
            raise OSError(msg.error_code(), "rtnetlink refused the address change")


def wait_event(sock: socket.socket, msg_type: int, key: bytes, timeout: float) -> float | None:
    """perf_counter() when the event arrived, or None after `timeout` seconds."""
    deadline = time.perf_counter() + timeout
    while (left := deadline - time.perf_counter()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return None
        buf = sock.recv(1 << 20)
        now = time.perf_counter()
        if carries(buf, msg_type, key):
            return now
    return None


def drain(sock: socket.socket, quiet: float = 0.5, limit: float = 15.0) -> None:
    """Swallow events until none came for `quiet` seconds (startup settling)."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        ready, _, _ = select.select([sock], [], [], quiet)
        if not ready:
            return
        sock.recv(1 << 20)


def worker(params: dict[str, Any]) -> dict[str, Any]:
    index = socket.if_nametoindex(LINK)
    key = socket.inet_aton(ADDRESS)[:3] + b"\0"  # the /24's first address
    events = nft_events()
    rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    rtnl.bind((0, 0))
    drain(events)
    rng = random.Random(7)
    samples: dict[str, list[float]] = {"add": [], "remove": []}
    missed = {"add": 0, "remove": 0}
    steps = (("add", RTM_NEWADDR, NFT_NEWSETELEM), ("remove", RTM_DELADDR, NFT_DELSETELEM))
    seq = 1
    for _cycle in range(int(params["cycles"])):
        for op, rtm, event in steps:
            message = addr_message(rtm, index, seq)
            seq += 1
            start = time.perf_counter()
            rtnl.send(message)
            check_ack(rtnl)
            arrived = wait_event(events, event, key, timeout=5.0)
            if arrived is None:
                missed[op] += 1
            else:
                samples[op].append((arrived - start) * 1000)
            time.sleep(rng.uniform(0.03, 0.08))  # let the daemon go idle; not timed
    return {"samples": samples, "missed": missed}


# --- parent -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    with tempfile.TemporaryDirectory(prefix="tpb-react-") as tmp, netns("react") as ns:
        bypass = Path(tmp) / "bypass.txt"
        bypass.write_text("\n".join(bypass_lines(args.bypass, 2000)) + "\n")
        config = Path(tmp) / "config.toml"
        write_config(config, bypass, {LINK: "lan"})
        sh("ip", "-n", ns, "link", "add", LINK, "type", "veth", "peer", "name", PEER)
        for name in (LINK, PEER):
            sh("ip", "-n", ns, "link", "set", name, "up")
        daemon = Daemon(ns, config)
        try:
            log(f"reaction: starting tproxyd with {args.bypass} + 2000 bypass CIDRs")
            ready = daemon.start()
            log(f"reaction: tproxyd ready after {ready:.2f} s; {args.cycles} cycles")
            result = run_worker(ns, __file__, {"cycles": args.cycles})
        finally:
            daemon.stop()
    return save_results("reaction", {**result, "bypass": args.bypass, "ready_s": ready})


def main(argv: Sequence[str]) -> int:
    return bench_main(argv, parse_args, run, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
