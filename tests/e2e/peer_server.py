"""Test responder run inside a namespace: every reply names the peer address and port it saw.

TCP ports speak minimal HTTP ("whoami"), also on port 53: the tests care about which path a
connection took, not about the DNS wire format. UDP ports echo "peer=ADDR port=PORT". UDP
sockets are bound per address (not to the wildcard) so a reply always leaves from the address
the request was sent to; a connected client socket drops replies from any other source.

Usage: peer_server.py --tcp 8080 --udp 5300 --addr 198.51.100.2 --addr 2001:db8:2::2 ...
"""

from __future__ import annotations

import argparse
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def peer_line(addr: str, port: int) -> bytes:
    if addr.startswith("::ffff:"):  # v4 client on the dual-stack listener
        addr = addr.removeprefix("::ffff:")
    return f"peer={addr} port={port}\n".encode()


class WhoAmI(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = peer_line(*self.client_address[:2])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep stderr quiet
        pass


class DualStackHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def udp_echo(addr: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(peer_line(peer[0], peer[1]).rstrip(b"\n") + b" data=" + data, peer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    parser.add_argument("--addr", action="append", default=[], help="address to bind UDP to")
    args = parser.parse_args()
    threads = [
        threading.Thread(target=DualStackHTTPServer(("::", port), WhoAmI).serve_forever, daemon=True)
        for port in args.tcp
    ]
    threads += [
        threading.Thread(target=udp_echo, args=(addr, port), daemon=True) for addr in args.addr for port in args.udp
    ]
    for t in threads:
        t.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
