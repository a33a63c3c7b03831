"""tproxyd beside a real firewalld 1.3 (stock configuration, every link in the default zone
`public`, nftables backend) in the gateway namespace: lan and host mode proxy TCP and UDP over
IPv4 and IPv6, the zone still guards the gateway itself, firewalld's reloads, restarts and late
start are followed, and stopping tproxyd leaves firewalld exactly as it was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.integration.harness import PrivateBus

from . import harness as h
from .conftest import StartDaemon
from .firewalld import Firewalld, missing
from .neighbours import all_proxied, assert_reported, follows_the_firewall

pytestmark = pytest.mark.root

GATEWAY_PORT = 8097  # a service on the gateway itself that zone public does not open


@pytest.fixture(scope="module")
def firewalld(lab: h.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Firewalld]:
    if problem := missing():
        pytest.skip(problem)
    fw = Firewalld(tmp_path_factory.mktemp("firewalld"), h.GW)
    try:
        fw.start_bus()
        fw.start()
        yield fw
    finally:
        fw.close()
    # CleanupOnExit: firewalld takes its table with it; nothing of it may stay in the lab.
    assert "inet firewalld" not in h.nft_tables(h.GW)


@pytest.fixture
def running(firewalld: Firewalld) -> Iterator[Firewalld]:
    """firewalld up at the start of the test (a test may stop it) and at its end."""
    if firewalld.proc is None:
        firewalld.start()
    yield firewalld
    if firewalld.proc is None:
        firewalld.start()


def _admission(ns: str = h.GW) -> bool:
    chain = h.in_ns(ns, "nft", "list", "chain", "inet", "firewalld", "filter_INPUT", check=False).stdout
    return "tproxyd: admit diverted packets" in chain


def test_lan_and_host_mode_proxy_through_firewalld(lab: h.Lab, running: Firewalld, start_tproxyd: StartDaemon) -> None:
    start_tproxyd()  # ready: firewalld admits diverted packets from then on
    all_proxied(lab)


@pytest.mark.parametrize("zone", ["block", "drop"])
def test_a_zone_change_of_the_links_keeps_them_proxied(
    lab: h.Lab, running: Firewalld, start_tproxyd: StartDaemon, zone: str
) -> None:
    start_tproxyd()
    for link in (h.LAN_LINK, h.UP_LINK):  # what NetworkManager does for connection.zone
        running.cmd(f"--zone={zone}", f"--change-interface={link}")
    try:
        all_proxied(lab)
    finally:
        for link in (h.LAN_LINK, h.UP_LINK):
            running.cmd(f"--zone={zone}", f"--remove-interface={link}")


def test_zone_still_rejects_gateway_ports_it_does_not_open(
    lab: h.Lab, running: Firewalld, start_tproxyd: StartDaemon
) -> None:
    start_tproxyd()
    h.wait_until(_admission, 10, "tproxyd's rule in firewalld's input chain")
    server = h.start_peer_server(h.GW, lab.workdir / "gateway-service.log", (GATEWAY_PORT,), ())
    try:
        for family in (4, 6):
            with pytest.raises(AssertionError, match="curl rc"):
                h.http_get(h.CLI, h.CLIENT.of(family), h.GW_LAN.of(family), GATEWAY_PORT)
        # The service answers once the zone opens its port: the refusal above was the zone's.
        running.cmd(f"--add-port={GATEWAY_PORT}/tcp")
        try:
            for family in (4, 6):
                flow = h.http_get(h.CLI, h.CLIENT.of(family), h.GW_LAN.of(family), GATEWAY_PORT)
                assert flow.seen_peer == h.CLIENT.of(family)
        finally:
            running.cmd(f"--remove-port={GATEWAY_PORT}/tcp")
    finally:
        h.stop_process(server)


def test_follows_reload_restart_and_a_late_start(lab: h.Lab, running: Firewalld, start_tproxyd: StartDaemon) -> None:
    running.stop()
    daemon = start_tproxyd()  # firewalld not running: nothing to admit
    running.start()  # firewalld after tproxyd

    def restart() -> None:
        running.stop()
        running.start()

    reload = ("firewall-cmd --reload", lambda: running.cmd("--reload"))  # rebuilds its table without our rule
    follows_the_firewall(lab, _admission, "firewalld started", [reload, ("a firewalld restart", restart)])
    assert daemon.running


def test_stop_and_release_leave_firewalld_as_it_was(
    lab: h.Lab, running: Firewalld, start_tproxyd: StartDaemon, tmp_path: Path
) -> None:
    runtime, permanent = running.runtime_state(), running.permanent_files()
    config = h.TproxydConfig(tmp_path / "conf")
    daemon = start_tproxyd(config)
    h.wait_until(_admission, 10, "tproxyd's rule in firewalld's input chain")
    assert running.permanent_files() == permanent, "tproxyd changed firewalld's permanent configuration"
    # Releasing the only lan link takes the rule out; host mode needs none (lo is trusted).
    daemon.reload(h.TproxydConfig(config.workdir, links={h.UP_LINK: "host"}))
    h.wait_until(lambda: not _admission(), 10, "tproxyd's rule gone after the lan link was released")
    daemon.reload(config)
    h.wait_until(_admission, 10, "tproxyd's rule back with the lan link")
    assert daemon.terminate() == 0
    assert not _admission(), "tproxyd left its rule in firewalld's input chain"
    assert running.runtime_state() == runtime
    assert running.permanent_files() == permanent
    support.wait_until(lambda: h.kernel_state(h.GW).absent, 5, "tproxyd's kernel state removed")


@pytest.mark.flushes_foreign_tables  # firewalld's iptables backend flushes every iptables table
def test_iptables_backend_is_reported_with_the_command_that_fixes_it(
    lab: h.Lab, running: Firewalld, start_tproxyd: StartDaemon, status_bus: PrivateBus
) -> None:
    conf = running.config / "firewalld.conf"
    stock = conf.read_text()
    running.stop()
    conf.write_text(stock.replace("FirewallBackend=nftables", "FirewallBackend=iptables"))
    h.in_ns(h.GW, "nft", "delete", "table", "ip", "nat")  # the foreign Docker-like table: iptables-incompatible
    try:
        running.start()
        daemon = start_tproxyd(bus_address=status_bus.address)
        daemon.wait_log("state degraded", 10)
        log = daemon.log_text()
        why = "firewalld runs its iptables backend"
        fix = (
            "sed -i 's/^FirewallBackend=.*/FirewallBackend=nftables/' /etc/firewalld/firewalld.conf"
            " && systemctl restart firewalld"
        )
        assert why in log and fix in log, log[-2000:]
        assert_reported(status_bus, why, fix)
    finally:
        running.stop()
        conf.write_text(stock)
        for family in ("ip", "ip6"):  # the iptables-nft tables it left behind
            for table in ("filter", "nat", "mangle", "raw", "security"):
                h.in_ns(h.GW, "nft", "delete", "table", family, table, check=False)
        h.install_foreign_tables(h.GW)
