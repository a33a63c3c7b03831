"""nf_tables set-element updates over raw netlink, in one atomic batch.

Why not libnftables: version 1.0.6 fetches the whole ruleset (every set element) before any
command, so adding one element costs ~14 ms with 10k bypass entries and ~500 ms with 100k.
A NEWSETELEM/DELSETELEM batch costs the same whatever else is loaded. pyroute2's nftables
module can't express interval-end flags reliably, so the few messages are encoded here.

Interval sets (rbtree) store a range [first, last] as two elements: `first`, and `last + 1`
flagged INTERVAL_END (omitted when the range reaches the top of the address space), exactly
as libnftables stores them, so elements added by either side can be deleted by the other."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
from collections.abc import Iterable

from ..cidrs import BITS
from ..errors import KernelError
from ..model import Interval
from ..rules.nft import IfnameChange, IntervalChange, SetChange, TableObjects

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
NLA_F_NESTED = 0x8000
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 0x1
IFNAMSIZ = 16
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")


def _attr(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, attr_type) + payload + b"\0" * (-length % 4)


def _nested(attr_type: int, payload: bytes) -> bytes:
    return _attr(attr_type | NLA_F_NESTED, payload)


def _message(msg_type: int, flags: int, seq: int, family: int, res_id: int, payload: bytes) -> bytes:
    body = _NFGENMSG.pack(family, 0, socket.htons(res_id)) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _element(key: bytes, interval_end: bool = False) -> bytes:
    payload = _nested(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key))
    if interval_end:
        payload += _attr(NFTA_SET_ELEM_FLAGS, struct.pack("!I", NFT_SET_ELEM_INTERVAL_END))
    return _nested(NFTA_LIST_ELEM, payload)


def ifname_key(name: str) -> bytes:
    """nft stores ifname keys as IFNAMSIZ bytes, NUL padded."""
    return name.encode().ljust(IFNAMSIZ, b"\0")


def interval_elements(family: int, iv: Interval) -> list[bytes]:
    size = BITS[family] // 8
    elements = [_element(iv.first.to_bytes(size, "big"))]
    if iv.last + 1 < 1 << BITS[family]:
        elements.append(_element((iv.last + 1).to_bytes(size, "big"), interval_end=True))
    return elements


def encode_change(change: SetChange, table: str) -> list[tuple[int, bytes]]:
    """(message type, payload) pairs: deletions first so a replaced interval never overlaps."""
    if isinstance(change, IfnameChange):
        removed = [_element(ifname_key(n)) for n in change.remove]
        added = [_element(ifname_key(n)) for n in change.add]
    else:
        assert isinstance(change, IntervalChange)
        removed = [e for iv in change.remove for e in interval_elements(change.family, iv)]
        added = [e for iv in change.add for e in interval_elements(change.family, iv)]
    head = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(
        NFTA_SET_ELEM_LIST_SET, change.set_name.encode() + b"\0"
    )
    out = []
    if isinstance(change, IfnameChange) and change.flush:  # DELSETELEM without elements: all of them
        out.append((NFT_MSG_DELSETELEM, head))
    if removed:
        out.append((NFT_MSG_DELSETELEM, head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(removed))))
    if added:
        out.append((NFT_MSG_NEWSETELEM, head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(added))))
    return out


class SetElementWriter:
    """Sends element changes for one table as a single nf_tables transaction (all or nothing).

    The socket stays open: closing an nf_tables socket right after a transaction that deleted
    something waits for the kernel's deferred destroy work (~4-16 ms, measured in BENCHMARKS.md)."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._seq = itertools.count((os.getpid() & 0xFFFF) << 16)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
            sock.settimeout(2.0)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def apply(self, changes: Iterable[SetChange]) -> None:
        parts = [p for change in changes for p in encode_change(change, self.table)]
        if not parts:
            return
        with self._lock:
            sock = self._socket()
            data, seqs = self._batch(parts)
            try:
                sock.send(data)
                errors = self._collect_acks(sock, seqs)
            except BaseException:
                # Unread answers would confuse the next call: start over with a fresh socket.
                sock.close()
                self._sock = None
                raise
        if errors:
            first = next(iter(errors.values()))
            raise KernelError(f"updating nftables set elements failed: {os.strerror(first)}")

    def _batch(self, parts: list[tuple[int, bytes]]) -> tuple[bytes, set[int]]:
        chunks = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next(self._seq), 0, NFNL_SUBSYS_NFTABLES, b"")]
        seqs = set()
        for msg_type, payload in parts:
            seq = next(self._seq)
            seqs.add(seq)
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if msg_type == NFT_MSG_NEWSETELEM else 0)
            chunks.append(_message((NFNL_SUBSYS_NFTABLES << 8) | msg_type, flags, seq, NFPROTO_INET, 0, payload))
        chunks.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, next(self._seq), 0, NFNL_SUBSYS_NFTABLES, b""))
        return b"".join(chunks), seqs

    @staticmethod
    def _collect_acks(sock: socket.socket, seqs: set[int]) -> dict[int, int]:
        """Every message asked for an ACK; an aborted batch reports the failing message(s)."""
        pending = set(seqs)
        errors: dict[int, int] = {}
        while pending:
            try:
                buf = sock.recv(65536)
            except TimeoutError:
                if errors:  # the kernel may not ack the rest of an aborted batch
                    break
                raise KernelError("no answer from nf_tables to a set-element update") from None
            offset = 0
            while offset + _NLMSGHDR.size <= len(buf):
                length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(buf, offset)
                if msg_type == NLMSG_ERROR and seq in pending:  # answers to older batches: skip
                    (code,) = struct.unpack_from("=i", buf, offset + _NLMSGHDR.size)
                    pending.discard(seq)
                    if code:
                        errors[seq] = -code
                offset += (length + 3) & ~3
        return errors


NFT_MSG_GETTABLE = 1
NFT_MSG_NEWTABLE = 0
NFT_MSG_NEWCHAIN = 3
NFT_MSG_GETCHAIN = 4
NFT_MSG_NEWSET = 9
NFT_MSG_GETSET = 10
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NFTA_SET_FLAGS = 3
NFTA_SET_KEY_TYPE = 4
NFT_SET_ANONYMOUS = 0x1
NFT_DATATYPE_IFNAME = 41  # nftables' TYPE_IFNAME, stored by nft as the set's key type
NLM_F_DUMP = 0x300
NLMSG_DONE = 0x3


NFPROTO = {"inet": NFPROTO_INET, "ip": 2, "ip6": 10}


def table_exists(table: str, family: str = "inet") -> bool:
    """A single-table GETTABLE: microseconds, whatever the table holds."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.settimeout(2.0)
        payload = _attr(NFTA_TABLE_NAME, table.encode() + b"\0")
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
        sock.send(_message(msg_type, NLM_F_REQUEST | NLM_F_ACK, 1, NFPROTO[family], 0, payload))
        found = False
        while True:
            buf = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(buf):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, offset)
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
                    found = True
                elif kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", buf, offset + _NLMSGHDR.size)
                    if code and code != -2:  # ENOENT just means "no such table"
                        raise KernelError(f"querying nftables failed: {os.strerror(-code)}")
                    return found
                offset += (length + 3) & ~3


def parse_attrs(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """The netlink attributes in buf[start:end], by type (the first of each type)."""
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        length, attr_type = struct.unpack_from("=HH", buf, start)
        if length < 4:
            break
        out.setdefault(attr_type & 0x3FFF, buf[start + 4 : start + length])
        start += (length + 3) & ~3
    return out


def _dump(sock: socket.socket, get: int, new: int, seq: int) -> list[dict[int, bytes]]:
    """The attributes of every object (`new` messages) a `get` dump answers with."""
    sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | get, NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, 0, b""))
    objects: list[dict[int, bytes]] = []
    while True:
        buf = sock.recv(1 << 16)
        offset = 0
        while offset + _NLMSGHDR.size <= len(buf):
            length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(buf, offset)
            if got_seq == seq:
                if kind == NLMSG_DONE:
                    return objects
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", buf, offset + _NLMSGHDR.size)
                    raise KernelError(f"listing nftables objects failed: {os.strerror(-code)}")
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | new:
                    objects.append(parse_attrs(buf, offset + _NLMSGHDR.size + _NFGENMSG.size, offset + length))
            offset += (length + 3) & ~3


def _text(raw: bytes | None) -> str:
    return (raw or b"").split(b"\0", 1)[0].decode(errors="replace")


def table_objects(table: str) -> TableObjects | None:
    """The chains and named sets of `table` (names only, however many elements), None without it."""
    if not table_exists(table):
        return None
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.settimeout(2.0)
        chains = frozenset(
            _text(a.get(NFTA_CHAIN_NAME))
            for a in _dump(sock, NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN, 1)
            if _text(a.get(NFTA_CHAIN_TABLE)) == table
        )
        sets, ifname_sets = set(), set()
        for a in _dump(sock, NFT_MSG_GETSET, NFT_MSG_NEWSET, 2):
            flags = struct.unpack("!I", a[NFTA_SET_FLAGS])[0] if len(a.get(NFTA_SET_FLAGS, b"")) == 4 else 0
            if _text(a.get(NFTA_SET_TABLE)) != table or flags & NFT_SET_ANONYMOUS:
                continue  # anonymous sets belong to their rules and go with them
            name = _text(a.get(NFTA_SET_NAME))
            sets.add(name)
            if a.get(NFTA_SET_KEY_TYPE) == struct.pack("!I", NFT_DATATYPE_IFNAME):
                ifname_sets.add(name)
    return TableObjects(chains, frozenset(sets), frozenset(ifname_sets))
