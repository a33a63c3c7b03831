"""A tiny DNS responder and client for the tests (standard library only, run inside namespaces).

serve: answers every A query with --a, every AAAA query with --aaaa and every TXT query with --txt
(the same fixed answer for any name, so a test knows which resolver answered), over UDP and TCP,
on each --addr port 53.
ask:   one query (A, AAAA or TXT; UDP or TCP) to a resolver; prints the answer's addresses or
texts, one a line; exits 1 without an answer.

Usage: dns_tool.py serve --a 192.0.2.1 --aaaa 2001:db8::1 --txt poisoned --addr 198.51.100.2 [--addr ...]
       dns_tool.py ask --server 10.77.0.1 --name tproxyd.test --type AAAA --tcp [--source ADDR]
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import socket
import socketserver
import struct
import sys
import threading

TYPES = {"A": 1, "AAAA": 28, "TXT": 16}
PORT = 53


def encode_name(name: str) -> bytes:
    labels = [label.encode() for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def skip_name(msg: bytes, pos: int) -> int:
    while True:
        length = msg[pos]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return pos + 2
        pos += 1 + length
        if length == 0:
            return pos


def query(name: str, qtype: int) -> tuple[int, bytes]:
    ident = secrets.randbelow(0x10000)
    return ident, struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)


def answer(request: bytes, a: str, aaaa: str, txt: str) -> bytes:
    ident, _flags, qdcount = struct.unpack("!HHH", request[:6])
    end = skip_name(request, 12)
    qtype, _qclass = struct.unpack("!HH", request[end : end + 4])
    question = request[12 : end + 4]
    records = b""
    if qtype in TYPES.values() and qdcount == 1:
        if qtype == TYPES["TXT"]:
            rdata = bytes([len(txt)]) + txt.encode()
        else:
            rdata = ipaddress.ip_address(a if qtype == TYPES["A"] else aaaa).packed
        records = b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 60, len(rdata)) + rdata
    header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1 if records else 0, 0, 0)
    return header + question + records


def parse_answer(msg: bytes, ident: int) -> list[str]:
    got_id, _flags, qdcount, ancount = struct.unpack("!HHHH", msg[:8])
    if got_id != ident:
        raise ValueError(f"answer id {got_id} is not the query's {ident}")
    pos = 12
    for _ in range(qdcount):
        pos = skip_name(msg, pos) + 4
    found = []
    for _ in range(ancount):
        pos = skip_name(msg, pos)
        rtype, _rclass, _ttl, length = struct.unpack("!HHIH", msg[pos : pos + 10])
        pos += 10
        if rtype == TYPES["TXT"]:
            found.append(msg[pos + 1 : pos + 1 + msg[pos]].decode())
        elif rtype in (TYPES["A"], TYPES["AAAA"]):
            found.append(str(ipaddress.ip_address(msg[pos : pos + length])))
        pos += length
    return found


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        data += chunk
    return data


def ask(server: str, name: str, qtype: str, tcp: bool, source: str | None, timeout: float) -> list[str]:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    ident, msg = query(name, TYPES[qtype])
    with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((server, PORT))
        if tcp:
            sock.sendall(struct.pack("!H", len(msg)) + msg)
            (length,) = struct.unpack("!H", recv_exact(sock, 2))
            reply = recv_exact(sock, length)
        else:
            sock.send(msg)
            reply = sock.recv(4096)
    return parse_answer(reply, ident)


def serve(addrs: list[str], a: str, aaaa: str, txt: str) -> None:
    class Tcp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            while True:
                try:
                    (length,) = struct.unpack("!H", recv_exact(sock, 2))
                    request = recv_exact(sock, length)
                except (ConnectionError, OSError):
                    return
                reply = answer(request, a, aaaa, txt)
                sock.sendall(struct.pack("!H", len(reply)) + reply)

    def udp(addr: str) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((addr, PORT))  # per address: a reply leaves from the address asked
        while True:
            request, peer = sock.recvfrom(4096)
            sock.sendto(answer(request, a, aaaa, txt), peer)

    threads = []
    for addr in addrs:
        server_class = type(
            "Server",
            (socketserver.ThreadingTCPServer,),
            {"address_family": socket.AF_INET6 if ":" in addr else socket.AF_INET, "daemon_threads": True,
             "allow_reuse_address": True},
        )  # fmt: skip
        threads.append(threading.Thread(target=server_class((addr, PORT), Tcp).serve_forever, daemon=True))
        threads.append(threading.Thread(target=udp, args=(addr,), daemon=True))
    for t in threads:
        t.start()
    threading.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--a", required=True)
    s.add_argument("--aaaa", required=True)
    s.add_argument("--txt", required=True)
    s.add_argument("--addr", action="append", required=True)
    q = sub.add_parser("ask")
    q.add_argument("--server", required=True)
    q.add_argument("--name", required=True)
    q.add_argument("--type", choices=sorted(TYPES), default="A")
    q.add_argument("--tcp", action="store_true")
    q.add_argument("--source")
    q.add_argument("--timeout", type=float, default=4)
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.addr, args.a, args.aaaa, args.txt)
        return 0
    try:
        found = ask(args.server, args.name, args.type, args.tcp, args.source, args.timeout)
    except (OSError, ValueError, struct.error) as e:
        print(f"no answer from {args.server}: {e}", file=sys.stderr)
        return 1
    print("\n".join(found))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
