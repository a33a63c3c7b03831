"""Our table's full replace as nf_tables netlink messages, for one batch (one kernel transaction).

The rule builder (rules/nft.py) stays the one description of the table, in libnftables JSON; this
module translates the small vocabulary it uses into the netlink messages `nft` itself would send
(checked against `nft`'s own listing by the kernel tests). Set elements come from the intervals
directly, pre-encoded and kept as bytes by the caller for the large bypass sets.

Why not libnftables for the replace: it reads the whole ruleset (every element of every set)
before each command and keeps ~70 MB after a 100k-element replace; building its JSON costs
another ~400 B per element. Netlink bytes cost ~40 B per interval and no cache at all."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from ..cidrs import BITS
from ..model import Interval, PackedIntervals
from .netlink_wire import attr, attr_str, attr_u32, nested

NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_DELSET = 11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800

# attribute numbers (linux/netfilter/nf_tables.h)
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 1, 3, 4, 5, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN = 1, 2, 3, 4, 5
NFTA_SET_DESC, NFTA_SET_ID, NFTA_SET_USERDATA, NFTA_SET_DESC_SIZE = 9, 10, 13, 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_LIST_SET_ID = 4
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS = 1, 3
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_INTERVAL = 0x1, 0x2, 0x4
NFT_SET_ELEM_INTERVAL_END = 0x1
NFT_REG_VERDICT, NFT_REG_1, NFT_REG_2 = 0, 1, 2
IFNAMSIZ = 16
# nftables' datatype numbers, stored as a set's key type (they decide how `nft list` prints it)
TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INET_PROTOCOL, TYPE_FIB_ADDR, TYPE_IFNAME = 7, 8, 12, 38, 41
# set userdata (NFTNL_UDATA_SET_KEYBYTEORDER): how `nft list` reads the keys back
_BIG_ENDIAN = b"\x00\x04\x02\x00\x00\x00"
_HOST_ENDIAN = b"\x00\x04\x01\x00\x00\x00"

_VERDICTS = {"accept": 1, "drop": 0, "return": -5, "jump": -3}
_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_NFPROTO = {"ip": 2, "ip6": 10, "ipv4": 2, "ipv6": 10}
_META_KEYS = {"mark": 3, "iifname": 6, "oifname": 7, "nfproto": 15, "l4proto": 16}
# left-hand side -> how its right-hand constants are encoded, and the key type of a set of them
_L4PROTO = {"tcp": 6, "udp": 17}
_FIB_TYPES = {"local": 2, "broadcast": 3, "multicast": 5}
_CT_DIRECTION = {"original": 0, "reply": 1}
_CT_MARK = 3  # NFT_CT_MARK
_PAYLOAD = {  # (protocol, field) -> (nfproto dependency, base, offset, length)
    ("ip", "daddr"): (2, 1, 16, 4),
    ("ip6", "daddr"): (10, 1, 24, 16),
    ("th", "dport"): (None, 2, 2, 2),
    ("tcp", "dport"): (None, 2, 2, 2),  # the rules match `meta l4proto` themselves before these
    ("udp", "dport"): (None, 2, 2, 2),
}


class UnsupportedJson(ValueError):
    """The rule builder used a construct this translator does not know (a bug, caught in tests)."""


def _u8(value: int) -> bytes:
    return bytes([value])


def _host_u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _ifname(name: str) -> bytes:
    return name.encode().ljust(IFNAMSIZ, b"\0")


def _expr(name: str, *attrs: bytes) -> bytes:
    return nested(NFTA_LIST_ELEM, attr_str(NFTA_EXPR_NAME, name) + nested(NFTA_EXPR_DATA, b"".join(attrs)))


def _value(data: bytes) -> bytes:
    return attr(NFTA_DATA_VALUE, data)


def _immediate(reg: int, data: bytes) -> bytes:
    return _expr("immediate", attr_u32(1, reg), nested(2, _value(data)))


def _verdict(code: str, chain: str | None = None) -> bytes:
    verdict = attr_u32(NFTA_VERDICT_CODE, _VERDICTS[code]) + (attr_str(NFTA_VERDICT_CHAIN, chain) if chain else b"")
    return _expr("immediate", attr_u32(1, NFT_REG_VERDICT), nested(2, nested(NFTA_DATA_VERDICT, verdict)))


def _meta_load(key: str) -> bytes:
    return _expr("meta", attr_u32(2, _META_KEYS[key]), attr_u32(1, NFT_REG_1))


def _cmp(data: bytes, negate: bool = False) -> bytes:
    return _expr("cmp", attr_u32(1, NFT_REG_1), attr_u32(2, 1 if negate else 0), nested(3, _value(data)))


# --- elements -----------------------------------------------------------------------------------


def _element(key: bytes, flags: int = 0) -> bytes:
    body = nested(NFTA_SET_ELEM_KEY, _value(key))
    if flags:
        body = attr_u32(NFTA_SET_ELEM_FLAGS, flags) + body
    return nested(NFTA_LIST_ELEM, body)


def interval_elements(family: int, intervals: Iterable[Interval], leading_end: bool = True) -> Iterator[bytes]:
    """Interval-set elements as `nft` stores them: `first`, and `last + 1` flagged INTERVAL_END
    (omitted at the top of the address space); for a whole set (`leading_end`) also an
    INTERVAL_END at 0 when the first range does not start there, as `nft` adds."""
    size = BITS[family] // 8
    top = 1 << BITS[family]
    # Every element of a family differs only in its key: the attribute headers are made once.
    start_head = _element(bytes(size))[:-size]
    end_head = _element(bytes(size), NFT_SET_ELEM_INTERVAL_END)[:-size]
    bounds = intervals.bounds() if isinstance(intervals, PackedIntervals) else ((i.first, i.last) for i in intervals)
    started = not leading_end
    for first, last in bounds:
        if not started and first != 0:
            yield end_head + bytes(size)
        started = True
        yield start_head + first.to_bytes(size)
        if last + 1 < top:
            yield end_head + (last + 1).to_bytes(size)


MAX_ELEMENTS_BYTES = 60_000  # a nested attribute's length is 16 bits: elements go in chunks


def chunk_elements(elements: Iterable[bytes]) -> list[bytes]:
    """Concatenated elements, each chunk small enough for one NEWSETELEM message."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for element in elements:
        if size + len(element) > MAX_ELEMENTS_BYTES:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(element)
        size += len(element)
    if current:
        chunks.append(b"".join(current))
    return chunks


def encode_interval_set(family: int, intervals: Iterable[Interval]) -> tuple[bytes, ...]:
    """The compact form kept for a large set between replaces: a few bytes objects, ~40 B each
    interval (IPv4), instead of a JSON element per entry."""
    return tuple(chunk_elements(interval_elements(family, intervals)))


def ifname_elements(names: Iterable[str]) -> list[bytes]:
    return chunk_elements(_element(_ifname(n)) for n in sorted(names))


# --- the translation ----------------------------------------------------------------------------

Msg = tuple[int, int, bytes]  # (nf_tables message type, extra netlink flags, payload)


class BatchBuilder:
    """Translates libnftables JSON commands on one table into netlink messages."""

    def __init__(self, family: str, table: str, elements: dict[str, list[bytes] | tuple[bytes, ...]]) -> None:
        self.family = family
        self.table = table
        self.elements = elements  # set name -> element chunks, sent right after the set is added
        self.messages: list[Msg] = []
        self._nfproto = 0
        self._set_ids: dict[str, int] = {}
        self._next_id = 1

    def _table_attr(self, attr_type: int) -> bytes:
        return attr_str(attr_type, self.table)

    def command(self, command: dict[str, Any]) -> None:
        ((verb, body),) = command.items()
        if verb == "metainfo":
            return
        ((kind, spec),) = body.items()
        if spec.get("family", self.family) != self.family or spec.get("table", spec.get("name")) is None:
            raise UnsupportedJson(f"{verb} {kind}: other family or no table")
        handler = getattr(self, f"_{verb}_{kind}", None)
        if handler is None:
            raise UnsupportedJson(f"{verb} {kind}")
        handler(spec)

    def _add_table(self, spec: dict[str, Any]) -> None:
        self.messages.append((NFT_MSG_NEWTABLE, NLM_F_CREATE, attr_str(NFTA_TABLE_NAME, spec["name"])))

    def _delete_table(self, spec: dict[str, Any]) -> None:
        self.messages.append((NFT_MSG_DELTABLE, 0, attr_str(NFTA_TABLE_NAME, spec["name"])))

    def _flush_table(self, spec: dict[str, Any]) -> None:  # every rule of the table
        self.messages.append((NFT_MSG_DELRULE, 0, attr_str(NFTA_RULE_TABLE, spec["name"])))

    def _delete_chain(self, spec: dict[str, Any]) -> None:
        payload = self._table_attr(NFTA_CHAIN_TABLE) + attr_str(NFTA_CHAIN_NAME, spec["name"])
        self.messages.append((NFT_MSG_DELCHAIN, 0, payload))

    def _delete_set(self, spec: dict[str, Any]) -> None:
        payload = self._table_attr(NFTA_SET_TABLE) + attr_str(NFTA_SET_NAME, spec["name"])
        self.messages.append((NFT_MSG_DELSET, 0, payload))

    def _add_chain(self, spec: dict[str, Any]) -> None:
        payload = self._table_attr(NFTA_CHAIN_TABLE) + attr_str(NFTA_CHAIN_NAME, spec["name"])
        if "hook" in spec:
            hook = attr_u32(NFTA_HOOK_HOOKNUM, _HOOKS[spec["hook"]]) + attr_u32(NFTA_HOOK_PRIORITY, spec["prio"])
            policy = _VERDICTS[spec.get("policy", "accept")]
            payload += nested(NFTA_CHAIN_HOOK, hook) + attr_u32(NFTA_CHAIN_POLICY, policy)
            payload += attr_str(NFTA_CHAIN_TYPE, spec["type"])
        self.messages.append((NFT_MSG_NEWCHAIN, NLM_F_CREATE, payload))

    def _add_set(self, spec: dict[str, Any]) -> None:
        if spec.get("elem"):
            raise UnsupportedJson("set elements in JSON: pass them pre-encoded")
        key_type, key_len, userdata = {
            "ipv4_addr": (TYPE_IPADDR, 4, _BIG_ENDIAN),
            "ipv6_addr": (TYPE_IP6ADDR, 16, _BIG_ENDIAN),
            "ifname": (TYPE_IFNAME, IFNAMSIZ, _HOST_ENDIAN),
        }[spec["type"]]
        flags = NFT_SET_INTERVAL if "interval" in spec.get("flags", []) else 0
        self._new_set(spec["name"], flags, key_type, key_len, userdata, self.elements.get(spec["name"], ()))

    def _new_set(
        self,
        name: str,
        flags: int,
        key_type: int,
        key_len: int,
        userdata: bytes,
        chunks: Iterable[bytes],
        size: int = 0,
    ) -> int:
        set_id = self._next_id
        self._next_id += 1
        self._set_ids[name] = set_id
        payload = (
            self._table_attr(NFTA_SET_TABLE)
            + attr_str(NFTA_SET_NAME, name)
            + attr_u32(NFTA_SET_FLAGS, flags)
            + attr_u32(NFTA_SET_KEY_TYPE, key_type)
            + attr_u32(NFTA_SET_KEY_LEN, key_len)
            + attr_u32(NFTA_SET_ID, set_id)
        )
        if size:
            payload += nested(NFTA_SET_DESC, attr_u32(NFTA_SET_DESC_SIZE, size))
        payload += attr(NFTA_SET_USERDATA, userdata)
        self.messages.append((NFT_MSG_NEWSET, NLM_F_CREATE, payload))
        head = (
            self._table_attr(NFTA_SET_ELEM_LIST_TABLE)
            + attr_str(NFTA_SET_ELEM_LIST_SET, name)
            + attr_u32(NFTA_SET_ELEM_LIST_SET_ID, set_id)
        )
        for chunk in chunks:
            self.messages.append((NFT_MSG_NEWSETELEM, NLM_F_CREATE, head + nested(NFTA_SET_ELEM_LIST_ELEMENTS, chunk)))
        return set_id

    def _add_rule(self, spec: dict[str, Any]) -> None:
        self._nfproto = 0  # the network family the rule matched so far (decides `reject`'s ICMP)
        exprs = b"".join(self._statement(e) for e in spec["expr"])
        payload = (
            self._table_attr(NFTA_RULE_TABLE)
            + attr_str(NFTA_RULE_CHAIN, spec["chain"])
            + nested(NFTA_RULE_EXPRESSIONS, exprs)
        )
        self.messages.append((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, payload))

    # --- statements and expressions ---

    def _statement(self, stmt: dict[str, Any]) -> bytes:
        ((kind, body),) = stmt.items()
        if kind in ("accept", "drop", "return"):
            return _verdict(kind)
        if kind == "jump":
            return _verdict("jump", body["target"])
        if kind == "counter":
            return _expr("counter")
        if kind == "reject":
            if body == {"type": "tcp reset"}:
                kind_code = (1, 0)  # NFT_REJECT_TCP_RST
            elif body is None:  # port unreachable, in the family's own ICMP when the rule knows it
                kind_code = {2: (0, 3), 10: (0, 4)}.get(self._nfproto, (2, 1))
            else:
                raise UnsupportedJson(f"reject {body}")
            return _expr("reject", attr_u32(1, kind_code[0]), attr(2, _u8(kind_code[1])))
        if kind == "match":
            return self._match(body["left"], body["right"], body["op"])
        if kind == "mangle" and body["key"] == {"ct": {"key": "mark"}}:
            load, _encode, _key = self._load(body["value"])  # ct mark | BIT, masked
            return load + _expr("ct", attr_u32(2, _CT_MARK), attr_u32(4, NFT_REG_1))
        if kind == "mangle" and body["key"] == {"meta": {"key": "mark"}}:
            return _immediate(NFT_REG_1, _host_u32(body["value"])) + _expr(
                "meta", attr_u32(2, _META_KEYS["mark"]), attr_u32(3, NFT_REG_1)
            )
        if kind == "tproxy":
            family = socket.AF_INET if body["family"] == "ip" else socket.AF_INET6
            return (
                _immediate(NFT_REG_1, socket.inet_pton(family, body["addr"]))
                + _immediate(NFT_REG_2, struct.pack("!H", body["port"]))
                + _expr(
                    "tproxy",
                    attr_u32(1, _NFPROTO[body["family"]]),
                    attr_u32(2, NFT_REG_1),
                    attr_u32(3, NFT_REG_2),
                )
            )
        raise UnsupportedJson(f"statement {kind}")

    def _match(self, left: dict[str, Any], right: Any, op: str) -> bytes:
        if op not in ("==", "!="):
            raise UnsupportedJson(f"operator {op}")
        negate = op == "!="
        load, encode, set_key = self._load(left)
        if isinstance(right, str) and right.startswith("@"):
            name = right[1:]
            return load + self._lookup(name, self._set_ids.get(name, 0), negate)
        if isinstance(right, dict) and "set" in right:
            key_type, key_len, userdata = set_key
            values = sorted(encode(v) for v in right["set"])
            chunks = chunk_elements(_element(v) for v in values)
            set_id = self._new_set(
                "__set%d", NFT_SET_ANONYMOUS | NFT_SET_CONSTANT, key_type, key_len, userdata, chunks, len(values)
            )
            return load + self._lookup("__set%d", set_id, negate)
        if left == {"meta": {"key": "nfproto"}} and not negate:
            self._nfproto = _NFPROTO[right]
        return load + _cmp(encode(right), negate)

    @staticmethod
    def _payload(base: int, offset: int, length: int) -> bytes:
        fields = attr_u32(2, base) + attr_u32(3, offset) + attr_u32(4, length)
        return _expr("payload", attr_u32(1, NFT_REG_1), fields)

    def _lookup(self, name: str, set_id: int, negate: bool) -> bytes:
        attrs = [attr_u32(2, NFT_REG_1), attr_str(1, name)]
        if set_id:
            attrs.append(attr_u32(4, set_id))
        if negate:
            attrs.append(attr_u32(5, 1))  # NFT_LOOKUP_F_INV
        return _expr("lookup", *attrs)

    def _load(self, left: dict[str, Any]) -> tuple[bytes, Any, tuple[int, int, bytes]]:
        """The expressions loading `left` into register 1, how a constant for it is encoded, and
        the key (type, length, userdata) of an anonymous set of such constants."""
        ((kind, body),) = left.items()
        if kind == "meta":
            key = body["key"]
            load = _meta_load(key)
            if key == "mark":
                return load, _host_u32, (0, 4, _HOST_ENDIAN)
            if key in ("iifname", "oifname"):
                return load, _ifname, (TYPE_IFNAME, IFNAMSIZ, _HOST_ENDIAN)
            if key == "nfproto":
                return load, lambda v: _u8(_NFPROTO[v]), (0, 1, _HOST_ENDIAN)
            if key == "l4proto":
                return load, lambda v: _u8(_L4PROTO[v]), (TYPE_INET_PROTOCOL, 1, _BIG_ENDIAN)
        elif kind == "payload":
            dep, base, offset, length = _PAYLOAD[(body["protocol"], body["field"])]
            load = b"" if dep is None else _meta_load("nfproto") + _cmp(_u8(dep))
            self._nfproto = dep or self._nfproto
            if body["field"] == "daddr":
                family = socket.AF_INET if dep == 2 else socket.AF_INET6
                return (
                    load + self._payload(base, offset, length),
                    lambda v: socket.inet_pton(family, v),
                    (0, length, _BIG_ENDIAN),
                )
            load += self._payload(base, offset, length)
            return load, lambda v: int(v).to_bytes(length, "big"), (0, length, _BIG_ENDIAN)
        elif kind in ("&", "|") and len(body) == 2 and isinstance(body[1], int):
            load, encode, set_key = self._load(body[0])
            if encode is not _host_u32:
                raise UnsupportedJson(f"bitwise {kind} on {body[0]}")
            mask, xor = (body[1], 0) if kind == "&" else (~body[1] & 0xFFFFFFFF, body[1])
            load += _expr(
                "bitwise",
                attr_u32(1, NFT_REG_1),
                attr_u32(2, NFT_REG_1),
                attr_u32(3, 4),
                nested(4, _value(_host_u32(mask))),
                nested(5, _value(_host_u32(xor))),
            )
            return load, encode, set_key
        elif kind == "ct" and body["key"] == "mark":
            return _expr("ct", attr_u32(2, _CT_MARK), attr_u32(1, NFT_REG_1)), _host_u32, (0, 4, _HOST_ENDIAN)
        elif kind == "ct" and body["key"] == "direction":
            load = _expr("ct", attr_u32(2, 1), attr_u32(1, NFT_REG_1))
            return load, lambda v: _u8(_CT_DIRECTION[v]), (0, 1, _HOST_ENDIAN)
        elif kind == "fib" and body == {"result": "type", "flags": ["daddr"]}:
            load = _expr("fib", attr_u32(1, NFT_REG_1), attr_u32(2, 3), attr_u32(3, 2))  # addrtype of daddr
            return load, lambda v: _host_u32(_FIB_TYPES[v]), (TYPE_FIB_ADDR, 4, _HOST_ENDIAN)
        elif kind == "socket" and body["key"] == "transparent":
            load = _expr("socket", attr_u32(1, 0), attr_u32(2, NFT_REG_1), attr_u32(3, 0))
            return load, lambda v: _u8(int(v)), (0, 1, _HOST_ENDIAN)
        raise UnsupportedJson(f"match on {left}")


def translate(commands: list[dict[str, Any]], family: str, table: str, elements: dict[str, Any]) -> list[Msg]:
    builder = BatchBuilder(family, table, elements)
    for command in commands:
        builder.command(command)
    return builder.messages
