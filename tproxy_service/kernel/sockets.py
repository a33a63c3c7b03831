"""Is the core really ready? Asks the kernel (sock_diag) which sockets are bound to the tproxy
port and whether IP_TRANSPARENT is set on them: "started" in the core's log proves neither
(v2ray logs it even when IP_TRANSPARENT failed, and a stale instance may hold the port)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .netlink_wire import NLMSG_DONE, NLMSG_ERROR, NLMSGHDR, messages, parse_attrs

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
TCP_LISTEN = 10
INET_DIAG_SOCKOPT = 22
SOCKOPT_TRANSPARENT = 0x20  # bit 5 of the first byte of struct inet_diag_sockopt
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes)
_REQ = struct.Struct("=BBBxI48x")
# inet_diag_msg: family, state, timer, retrans, sport(be16), dport(be16), src[16], dst[16], if, cookie[2],
# expires, rqueue, wqueue, uid, inode


@dataclass(frozen=True)
class BoundSocket:
    protocol: str  # "tcp" | "udp"
    family: int  # 4 | 6
    address: str
    port: int
    transparent: bool
    uid: int
    inode: int


def _dump(family: int, protocol: int) -> list[BoundSocket]:
    states = 1 << TCP_LISTEN if protocol == socket.IPPROTO_TCP else 0xFFFFFFFF
    request = _REQ.pack(family, protocol, 0, states)
    message = NLMSGHDR.pack(NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    found: list[BoundSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(2.0)
        sock.send(message + request)
        while True:
            for msg in messages(sock.recv(1 << 16)):
                if msg.kind == NLMSG_DONE:
                    return found
                if msg.kind == NLMSG_ERROR:
                    raise OSError(msg.error_code(), "sock_diag dump failed")
                if msg.kind == SOCK_DIAG_BY_FAMILY:
                    found.append(_parse(msg.buf, msg.start, msg.end, protocol))


def _parse(buf: bytes, start: int, end: int, protocol: int) -> BoundSocket:
    family, _state, _timer, _retrans = struct.unpack_from("=BBBB", buf, start)
    sport = struct.unpack_from("!H", buf, start + 4)[0]
    src = buf[start + 8 : start + 24]
    uid, inode = struct.unpack_from("=II", buf, start + 64)
    sockopt = parse_attrs(buf, start + 72, end).get(INET_DIAG_SOCKOPT, b"")
    transparent = bool(sockopt) and bool(sockopt[0] & SOCKOPT_TRANSPARENT)
    fam = 4 if family == socket.AF_INET else 6
    address = socket.inet_ntop(family, src[:4] if fam == 4 else src)
    return BoundSocket("tcp" if protocol == socket.IPPROTO_TCP else "udp", fam, address, sport, transparent, uid, inode)


def bound_to_port(port: int) -> list[BoundSocket]:
    """TCP listeners and UDP sockets on `port`, both families."""
    result = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for protocol in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            result += [s for s in _dump(family, protocol) if s.port == port]
    return result


def core_listening(port: int, ipv6: bool, udp: bool) -> tuple[bool, str]:
    """(ready, why not): transparent TCP (and UDP) sockets on 127.0.0.1 (and ::1) port `port`."""
    sockets = bound_to_port(port)
    wanted = [(p, f) for p in (("tcp", "udp") if udp else ("tcp",)) for f in ((4, 6) if ipv6 else (4,))]
    for protocol, family in wanted:
        matching = [s for s in sockets if (s.protocol, s.family) == (protocol, family)]
        if not matching:
            return False, f"nothing listens on {protocol}/IPv{family} port {port}"
        if not any(s.transparent for s in matching):
            return False, f"the {protocol}/IPv{family} socket on port {port} lacks IP_TRANSPARENT (core not root?)"
    return True, ""
