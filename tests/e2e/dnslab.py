"""DNS in the labs (e2e and NetworkManager tiers): the same name answered differently by a
"poisoned" resolver (what the network offers) and a "truthful" one (named only in the core's dns
section), so an answer says which of them it came from. The resolvers and the client are
tests/e2e/dns_tool.py, run inside the test namespaces."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import harness as h

DNS_TOOL = h.HERE / "dns_tool.py"
NAME = "www.tproxyd.test"
POISONED = h.Addr("203.0.113.66", "2001:db8:bad::66")
TRUTHFUL = h.Addr("198.51.100.77", "2001:db8:600d::77")


def ask(ns: str, server: str, family: int, proto: str, source: str | None = None, qtype: str = "") -> str:
    """What the resolver at `server` gives for NAME: its address (A for an IPv4 server, AAAA for
    an IPv6 one), or with qtype="TXT" its text ("poisoned" or "truthful")."""
    qtype = qtype or ("A" if family == 4 else "AAAA")
    args = [h.PYTHON, str(DNS_TOOL), "ask", "--server", server, "--name", NAME, "--type", qtype]
    args += ["--tcp"] if proto == "tcp" else []
    args += ["--source", source] if source else []
    proc = h.in_ns(ns, *args, check=False)
    assert proc.returncode == 0, f"{proto} {qtype} query from {ns} to {server}: {proc.stderr.strip()}"
    return proc.stdout.strip()


def verdict(answer: str, family: int) -> str:
    return {TRUTHFUL.of(family): "truthful", POISONED.of(family): "poisoned"}.get(answer, f"unexpected {answer!r}")


def start_resolver(ns: str, log: Path, answers: h.Addr, addrs: list[str]) -> subprocess.Popen[bytes]:
    """A resolver answering `answers` on port 53 (UDP and TCP) of each address in `addrs`."""
    txt = "truthful" if answers == TRUTHFUL else "poisoned"
    args = [h.PYTHON, str(DNS_TOOL), "serve", "--a", answers.v4, "--aaaa", answers.v6, "--txt", txt]
    proc = h.spawn(ns, args + [x for a in addrs for x in ("--addr", a)], log)
    wanted = {(p, h.host_port(a, 53)) for a in addrs for p in ("tcp", "udp")}
    h.wait_listening(ns, wanted, f"resolver on {addrs}")
    return proc
