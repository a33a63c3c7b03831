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
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from ..errors import KernelError
from ..rules.nft import IfnameChange, IntervalChange, SetChange, TableObjects
from .netlink_wire import NLMSG_DONE, NLMSG_ERROR, NLMSGHDR, attr, messages, nested, parse_attrs
from .nft_batch import (
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    NLM_F_CREATE,
    Msg,
    chunk_elements,
    ifname_elements,
    interval_elements,
)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # error answers without a copy of the (up to 60 kB) request
SO_SNDBUFFORCE = 32
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
_NFGENMSG = struct.Struct("=BBH")


def _message(msg_type: int, flags: int, seq: int, family: int, res_id: int, payload: bytes) -> bytes:
    body = _NFGENMSG.pack(family, 0, socket.htons(res_id)) + payload
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def encode_change(change: SetChange, table: str) -> list[Msg]:
    """(message type, flags, payload): deletions first so a replaced interval never overlaps."""
    if isinstance(change, IfnameChange):
        removed = ifname_elements(change.remove)
        added = ifname_elements(change.add)
    else:
        assert isinstance(change, IntervalChange)
        removed = chunk_elements(e for iv in change.remove for e in interval_elements(change.family, (iv,), False))
        added = chunk_elements(e for iv in change.add for e in interval_elements(change.family, (iv,), False))
    head = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + attr(
        NFTA_SET_ELEM_LIST_SET, change.set_name.encode() + b"\0"
    )
    out: list[Msg] = []
    if isinstance(change, IfnameChange) and change.flush:  # DELSETELEM without elements: all of them
        out.append((NFT_MSG_DELSETELEM, 0, head))
    out += [(NFT_MSG_DELSETELEM, 0, head + nested(NFTA_SET_ELEM_LIST_ELEMENTS, c)) for c in removed]
    out += [(NFT_MSG_NEWSETELEM, NLM_F_CREATE, head + nested(NFTA_SET_ELEM_LIST_ELEMENTS, c)) for c in added]
    return out


class SetElementWriter:
    """Sends nf_tables messages for one table as a single transaction (all or nothing): element
    changes, or a whole replace built by nft_batch.

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
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.settimeout(5.0)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def apply(self, changes: Iterable[SetChange]) -> None:
        parts = [p for change in changes for p in encode_change(change, self.table)]
        self.transact(parts, "updating nftables set elements")

    def transact(self, parts: list[Msg], what: str = "replacing table inet tproxyd") -> None:
        """Send `parts` as one batch: the kernel applies all of them or, on any error, none."""
        if not parts:
            return
        with self._lock:
            sock = self._socket()
            data, seqs = self._batch(parts)
            try:
                if len(data) + 4096 > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
                    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + 4096)  # one send, one batch
                sock.send(data)
                errors = self._collect_acks(sock, seqs)
            except BaseException:
                # Unread answers would confuse the next call: start over with a fresh socket.
                sock.close()
                self._sock = None
                raise
        if errors:
            first = next(iter(errors.values()))
            raise KernelError(f"{what} failed: {os.strerror(first)}")

    def _batch(self, parts: list[Msg]) -> tuple[bytes, set[int]]:
        chunks = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next(self._seq), 0, NFNL_SUBSYS_NFTABLES, b"")]
        seqs = set()
        for msg_type, flags, payload in parts:
            seq = next(self._seq)
            seqs.add(seq)
            kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
            chunks.append(_message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, NFPROTO_INET, 0, payload))
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
                raise KernelError("no answer from nf_tables to a batch") from None
            for msg in messages(buf):
                if msg.kind == NLMSG_ERROR and msg.seq in pending:  # answers to older batches: skip
                    pending.discard(msg.seq)
                    if msg.error_code():
                        errors[msg.seq] = msg.error_code()
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


NFPROTO = {"inet": NFPROTO_INET, "ip": 2, "ip6": 10}
_T = TypeVar("_T")


class TableQuery:
    """Read-only nf_tables queries (does a table exist, its chains and sets) on one kept socket.

    Kept for the same reason as SetElementWriter's: the kernel makes the close of an nf_tables
    socket wait for the deferred destroy work of the last transaction that deleted something
    (~1.5 ms after a DisableLink's element delete), and the firewall admission asks for several
    tables on every reconcile pass."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def exists(self, table: str, family: str = "inet") -> bool:
        """A single-table GETTABLE: microseconds, whatever the table holds."""
        with self._lock:
            return self._ask(lambda sock: _table_exists(sock, table, family, next(self._seq)))

    def objects(self, table: str) -> TableObjects | None:
        """The chains and named sets of `table` (names only, however many elements), None without it."""
        with self._lock:
            return self._ask(lambda sock: _table_objects(sock, table, self._seq))

    def _ask(self, query: Callable[[socket.socket], _T]) -> _T:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
            sock.settimeout(2.0)
            self._sock = sock
        try:
            return query(self._sock)
        except BaseException:
            # Unread answers would confuse the next query: start over with a fresh socket.
            self._sock.close()
            self._sock = None
            raise


def table_exists(table: str, family: str = "inet") -> bool:
    """One query on a socket of its own (the daemon keeps a TableQuery)."""
    query = TableQuery()
    try:
        return query.exists(table, family)
    finally:
        query.close()


def _table_exists(sock: socket.socket, table: str, family: str, seq: int) -> bool:
    payload = attr(NFTA_TABLE_NAME, table.encode() + b"\0")
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
    sock.send(_message(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, NFPROTO[family], 0, payload))
    found = False
    while True:
        for msg in messages(sock.recv(65536)):
            if msg.seq != seq:
                continue
            if msg.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
                found = True
            elif msg.kind == NLMSG_ERROR:
                code = msg.error_code()
                if code and code != 2:  # ENOENT just means "no such table"
                    raise KernelError(f"querying nftables failed: {os.strerror(code)}")
                return found


def _dump(sock: socket.socket, get: int, new: int, seq: int) -> list[dict[int, bytes]]:
    """The attributes of every object (`new` messages) a `get` dump answers with."""
    sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | get, NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, 0, b""))
    objects: list[dict[int, bytes]] = []
    while True:
        for msg in messages(sock.recv(1 << 16)):
            if msg.seq != seq:
                continue
            if msg.kind == NLMSG_DONE:
                return objects
            if msg.kind == NLMSG_ERROR:
                raise KernelError(f"listing nftables objects failed: {os.strerror(msg.error_code())}")
            if msg.kind == (NFNL_SUBSYS_NFTABLES << 8) | new:
                objects.append(parse_attrs(msg.buf, msg.start + _NFGENMSG.size, msg.end))


def _text(raw: bytes | None) -> str:
    return (raw or b"").split(b"\0", 1)[0].decode(errors="replace")


def _table_objects(sock: socket.socket, table: str, seq: Iterator[int]) -> TableObjects | None:
    if not _table_exists(sock, table, "inet", next(seq)):
        return None
    chains = frozenset(
        _text(a.get(NFTA_CHAIN_NAME))
        for a in _dump(sock, NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN, next(seq))
        if _text(a.get(NFTA_CHAIN_TABLE)) == table
    )
    sets, ifname_sets = set(), set()
    for a in _dump(sock, NFT_MSG_GETSET, NFT_MSG_NEWSET, next(seq)):
        flags = struct.unpack("!I", a[NFTA_SET_FLAGS])[0] if len(a.get(NFTA_SET_FLAGS, b"")) == 4 else 0
        if _text(a.get(NFTA_SET_TABLE)) != table or flags & NFT_SET_ANONYMOUS:
            continue  # anonymous sets belong to their rules and go with them
        name = _text(a.get(NFTA_SET_NAME))
        sets.add(name)
        if a.get(NFTA_SET_KEY_TYPE) == struct.pack("!I", NFT_DATATYPE_IFNAME):
            ifname_sets.add(name)
    return TableObjects(chains, frozenset(sets), frozenset(ifname_sets))
