"""Notices when someone else changes table inet tproxyd (`nft delete table`, `nft flush
ruleset`, a deleted rule or element) and reports it as drift.

Every nf_tables transaction ends with a NEWGEN event whose header names the committing netlink
socket; changes committed through our own sockets are ignored. Listening makes the kernel emit one event per set
element, which would make our own 100k-entry replaces ~50% slower and flood this socket, so the
nft adapter pauses the watch around full replaces and checks the table right after.

The same socket watches neighbours' tables (firewalld's, ufw's): a change there (a reload
rebuilds them) calls that table's callback, so the daemon can put its rule back."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping

from ..kernel.netlink_wire import messages, parse_attrs
from ..kernel.nft_netlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO, NFPROTO_INET

log = logging.getLogger(__name__)
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
NFTA_TABLE_NAME_ATTR = 1  # the table name is attribute 1 in table/chain/rule/set/element messages
RCVBUF = 8 << 20


def _own_portids() -> set[int]:
    """The netlink port ids of our own sockets (libnftables' included).

    A NEWGEN message's header carries the committing socket's port id. That identifies our own
    commits in any PID namespace, unlike the task PID it also reports (given as the initial PID
    namespace sees it, so meaningless inside a container)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    portids = set()
    try:
        with open("/proc/self/net/netlink") as table:
            next(table, None)  # header: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            for line in table:
                fields = line.split()
                if len(fields) >= 10 and int(fields[9]) in inodes:
                    portids.add(int(fields[2]))
    except OSError:
        pass
    return portids


class NftDriftWatch:
    def __init__(
        self,
        table: str,
        on_drift: Callable[[str], None],
        neighbours: Mapping[tuple[str, str], Callable[[str], None]] | None = None,
    ) -> None:
        # (family, table name NUL-terminated as in the messages) -> its callback; neighbours are
        # keyed by ("ip", "filter") etc.
        self._callbacks = {(NFPROTO[f], name.encode() + b"\0"): cb for (f, name), cb in (neighbours or {}).items()}
        self._callbacks[(NFPROTO_INET, table.encode() + b"\0")] = on_drift
        self._sock: socket.socket | None = None
        self._touched: set[tuple[int, bytes]] = set()
        self._portids: set[int] = set()  # cache of _own_portids(), refreshed on a miss

    def _from_us(self, portid: int) -> bool:
        if portid == 0:  # the kernel's own
            return False
        if portid not in self._portids:
            self._portids = _own_portids()  # a socket opened since the last look
        return portid in self._portids

    def start(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        self._sock = sock
        self._touched = set()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def pause(self) -> None:
        if self._sock is None:
            return
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None

    resume = start

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                buf = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: events were lost, assume the worst
                log.warning("nftables event overflow (%s); re-checking our table", e)
                for callback in self._callbacks.values():
                    callback("nftables events lost")
                continue
            self._parse(buf)

    def _parse(self, buf: bytes) -> None:
        for msg in messages(buf):
            if msg.kind >> 8 != NFNL_SUBSYS_NFTABLES or msg.start + 4 > msg.end:
                continue
            family = buf[msg.start]
            attrs = parse_attrs(buf, msg.start + 4, msg.end)
            if msg.kind & 0xFF == NFT_MSG_NEWGEN:
                pid_raw = attrs.get(NFTA_GEN_PROC_PID)
                pid = struct.unpack("!I", pid_raw)[0] if pid_raw and len(pid_raw) == 4 else 0
                if self._touched and not self._from_us(msg.portid):
                    for key in self._touched:
                        self._callbacks[key](f"table changed by pid {pid}")
                self._touched = set()
            elif (key := (family, attrs.get(NFTA_TABLE_NAME_ATTR, b""))) in self._callbacks:
                self._touched.add(key)
