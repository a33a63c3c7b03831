"""Interface names are data in every path that leads to a full table replace: [links] at start,
EnableLink, state.json at a restart, a Reload that changes the table's skeleton, and the heal
after `nft delete table`. libnftables would read '@x' as a set reference (the replace fails for
good), '*' as the catch-all element (every link proxied), 'eth*' as a wildcard."""

from __future__ import annotations

import json

import pytest

from . import harness as h
from .conftest import MakeDaemon

pytestmark = pytest.mark.root

FROM_CONFIG = ["*", "@x", "eth*", "tcp"]
FROM_BUS = ["\\", '"', "é" * 7 + "z"]  # the last: 15 bytes of UTF-8, the most a name may have
PROBE_DEST = "198.51.100.7"  # no bypass applies (reserved ranges off): diverted if its link matched


def _toml_key(name: str) -> str:
    return json.dumps(name)  # a TOML basic string: the same escapes as JSON for these names


def _write_config(daemon: h.Tproxyd, port: int) -> None:
    daemon.write_config(extra=f'[tproxy]\nfailure_policy = "closed"\nport = {port}\n[bypass]\nreserved = false')
    with daemon.config.open("a") as config:  # it ends with an empty [links] table
        config.writelines(f'{_toml_key(n)} = "both"\n' for n in FROM_CONFIG)


def _set(daemon: h.Tproxyd, name: str) -> list[str] | None:
    proc = daemon.netns.exec("nft", "-j", "list", "set", "inet", "tproxyd", name, check=False)
    if proc.returncode:
        return None
    (found,) = [item["set"] for item in json.loads(proc.stdout)["nftables"] if "set" in item]
    return sorted(found.get("elem", []))


def _probe_arrivals(daemon: h.Tproxyd) -> int:
    out = daemon.netns.exec("nft", "-j", "list", "chain", "inet", "tpd_probe", "prerouting").stdout
    rules = [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]
    return sum(e["counter"]["packets"] for rule in rules for e in rule["expr"] if "counter" in e)


def _setup_probe(daemon: h.Tproxyd) -> None:
    """A packet the host sends to PROBE_DEST leaves by LINK_A and arrives on LINK_B, neither of
    them a proxied link; a counter after our hooks sees it arrive unless it was diverted."""
    ns = daemon.netns
    mac = json.loads(ns.exec("ip", "-j", "link", "show", h.LINK_B).stdout)[0]["address"]
    ns.exec("ip", "route", "add", f"{PROBE_DEST}/32", "dev", h.LINK_A)
    ns.exec("ip", "neigh", "add", PROBE_DEST, "lladdr", mac, "dev", h.LINK_A, "nud", "permanent")
    ns.exec("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{h.LINK_B}.rp_filter=0")
    ns.exec(
        "nft",
        "add table inet tpd_probe; add chain inet tpd_probe prerouting { type filter hook prerouting priority 0; }",
    )
    ns.exec("nft", f"add rule inet tpd_probe prerouting iifname {h.LINK_B} ip daddr {PROBE_DEST} counter")


def _assert_literal(daemon: h.Tproxyd, names: list[str], step: str) -> None:
    expected = sorted(names)
    h.wait_until(lambda: _set(daemon, "lan_links") == expected, 20, f"lan_links = {expected} after {step}")
    assert _set(daemon, "host_links") == expected, step
    before = _probe_arrivals(daemon)
    send = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{PROBE_DEST}', 9))"
    daemon.netns.exec(str(h.PYTHON), "-c", send)
    h.wait_until(
        lambda: _probe_arrivals(daemon) == before + 1, 10, f"the probe on another link to go direct after {step}"
    )


def _heal(daemon: h.Tproxyd, bus: h.PrivateBus, names: list[str], step: str) -> None:
    daemon.netns.exec("nft", "delete", "table", "inet", "tproxyd")
    _assert_literal(daemon, names, f"{step}, then `nft delete table`")
    assert bus.properties()["State"] == "active", daemon.log.read_text()


def test_names_stay_literal_through_every_full_replace(make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    daemon = make_daemon(start=False)
    _write_config(daemon, 1012)
    _setup_probe(daemon)
    daemon.start()
    _assert_literal(daemon, FROM_CONFIG, "start with [links]")
    _heal(daemon, bus, FROM_CONFIG, "start with [links]")

    for name in FROM_BUS:
        assert bus.call("EnableLink", "ss", [name, "both"]).error is None, name
    everything = FROM_CONFIG + FROM_BUS
    _assert_literal(daemon, everything, "EnableLink")
    _heal(daemon, bus, everything, "EnableLink")

    daemon.stop()
    daemon.start()  # the bus's choices come back from state.json
    _assert_literal(daemon, everything, "a restart")
    _heal(daemon, bus, everything, "a restart")

    _write_config(daemon, 1013)
    assert bus.call("Reload").error is None
    h.wait_until(lambda: "127.0.0.1:1013" in daemon.netns.nft_table(), 20, "the new port in the table")
    _assert_literal(daemon, everything, "a Reload that changes the skeleton")
    _heal(daemon, bus, everything, "a Reload")
