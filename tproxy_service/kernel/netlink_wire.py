"""The netlink wire format, once: the message header, attributes, and the walk over the messages
of one receive buffer. Used by every raw-netlink adapter (nf_tables, sock_diag, the nf_tables
event watch); each keeps only what its protocol adds."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Message:
    """One message of a receive buffer: its header fields and where its payload lies in `buf`."""

    buf: bytes
    kind: int
    flags: int
    seq: int
    portid: int
    start: int  # first byte after the header
    end: int

    def error_code(self) -> int:
        """For NLMSG_ERROR: the (positive) errno, 0 for an ACK."""
        code: int = struct.unpack_from("=i", self.buf, self.start)[0]
        return -code


def messages(buf: bytes) -> Iterator[Message]:
    """The messages in `buf`, in order (a truncated tail is ignored)."""
    offset = 0
    while offset + NLMSGHDR.size <= len(buf):
        length, kind, flags, seq, portid = NLMSGHDR.unpack_from(buf, offset)
        if length < NLMSGHDR.size:
            return
        yield Message(buf, kind, flags, seq, portid, offset + NLMSGHDR.size, min(offset + length, len(buf)))
        offset += (length + 3) & ~3


def attr(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _ATTR.pack(length, attr_type) + payload + b"\0" * (-length % 4)


def nested(attr_type: int, payload: bytes) -> bytes:
    return attr(attr_type | NLA_F_NESTED, payload)


def attr_u32(attr_type: int, value: int) -> bytes:
    """A u32 attribute in network byte order (nf_tables' convention); negative values wrap."""
    return attr(attr_type, struct.pack("!I", value & 0xFFFFFFFF))


def attr_str(attr_type: int, text: str) -> bytes:
    return attr(attr_type, text.encode() + b"\0")


def iter_attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Every netlink attribute in buf[start:end] as (type without flags, payload), in order."""
    while start + 4 <= end:
        length, attr_type = _ATTR.unpack_from(buf, start)
        if length < 4:
            return
        yield attr_type & 0x3FFF, buf[start + 4 : start + length]
        start += (length + 3) & ~3


def parse_attrs(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """The netlink attributes in buf[start:end], by type (the first of each type)."""
    out: dict[int, bytes] = {}
    for attr_type, payload in iter_attrs(buf, start, end):
        out.setdefault(attr_type, payload)
    return out
