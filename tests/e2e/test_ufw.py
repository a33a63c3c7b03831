"""tproxyd beside a real ufw (enabled: default deny incoming, INPUT policy DROP) in the gateway
namespace: lan and host mode proxy TCP and UDP over IPv4 and IPv6, ufw still drops what it does
not allow to the gateway itself, ufw enabled after tproxyd, `ufw reload` and disable/enable are
followed, and releasing the lan link or stopping tproxyd leaves ufw's rules (iptables-save)
exactly as they were."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import harness as h
from .conftest import StartDaemon
from .neighbours import all_proxied, follows_the_firewall
from .ufw import Ufw, missing

pytestmark = pytest.mark.root

GATEWAY_PORT = 8098  # a service on the gateway itself that ufw does not allow
OUR_RULE = '-m comment --comment "tproxyd: admit diverted packets" -j ACCEPT'


@pytest.fixture(scope="module")
def ufw(lab: h.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ufw]:
    if problem := missing():
        pytest.skip(problem)
    tables_before = set(h.nft_tables(h.GW))
    fw = Ufw(tmp_path_factory.mktemp("ufw"), h.GW)
    try:
        fw.cmd("--force", "enable")
        yield fw
    finally:
        fw.in_sandbox("ufw", "disable", check=False)
        foreign = {f"{family} {name}" for family, name in h.FOREIGN}
        for table in set(h.nft_tables(h.GW)) - tables_before - foreign:  # the iptables-nft tables ufw made
            h.in_ns(h.GW, "nft", "delete", "table", *table.split(), check=False)


def _admitted() -> bool:
    out = h.in_ns(h.GW, "iptables-save").stdout + h.in_ns(h.GW, "ip6tables-save").stdout
    return out.count(OUR_RULE) == 2  # ufw-before-input and ufw6-before-input


def test_lan_and_host_mode_proxy_through_ufw(lab: h.Lab, ufw: Ufw, start_tproxyd: StartDaemon) -> None:
    start_tproxyd()  # ready: ufw admits diverted packets from then on
    all_proxied(lab)


def test_ufw_still_drops_gateway_ports_it_does_not_allow(lab: h.Lab, ufw: Ufw, start_tproxyd: StartDaemon) -> None:
    start_tproxyd()
    server = h.start_peer_server(h.GW, lab.workdir / "gateway-service-ufw.log", (GATEWAY_PORT,), ())
    try:
        for family in (4, 6):
            with pytest.raises(AssertionError, match="curl rc"):
                h.http_get(h.CLI, h.CLIENT.of(family), h.GW_LAN.of(family), GATEWAY_PORT)
        ufw.cmd("allow", f"{GATEWAY_PORT}/tcp")  # the service answers once ufw allows it
        try:
            for family in (4, 6):
                flow = h.http_get(h.CLI, h.CLIENT.of(family), h.GW_LAN.of(family), GATEWAY_PORT)
                assert flow.seen_peer == h.CLIENT.of(family)
        finally:
            ufw.cmd("delete", "allow", f"{GATEWAY_PORT}/tcp")
    finally:
        h.stop_process(server)


def test_follows_a_late_enable_ufw_reload_and_re_enable(lab: h.Lab, ufw: Ufw, start_tproxyd: StartDaemon) -> None:
    ufw.cmd("disable")
    try:
        daemon = start_tproxyd()  # ufw not enabled: its INPUT policy accepts
    finally:
        ufw.cmd("--force", "enable")  # ufw after tproxyd

    def disable_and_enable() -> None:
        ufw.cmd("disable")
        ufw.cmd("--force", "enable")

    reload = ("ufw reload", lambda: ufw.cmd("reload"))  # rebuilds ufw's chains without our rule
    follows_the_firewall(lab, _admitted, "ufw was enabled", [reload, ("ufw disable and enable", disable_and_enable)])
    assert daemon.running


def test_stop_and_release_leave_ufw_rules_as_they_were(
    lab: h.Lab, ufw: Ufw, start_tproxyd: StartDaemon, tmp_path: Path
) -> None:
    before = ufw.iptables_save()
    config = h.TproxydConfig(tmp_path / "conf")
    daemon = start_tproxyd(config)
    h.wait_until(_admitted, 10, "tproxyd's rule in ufw's input chains")
    # Releasing the only lan link takes the rule out; host mode needs none (ufw accepts lo).
    daemon.reload(h.TproxydConfig(config.workdir, links={h.UP_LINK: "host"}))
    h.wait_until(lambda: ufw.iptables_save() == before, 10, "tproxyd's rules gone after the lan link was released")
    daemon.reload(config)
    h.wait_until(_admitted, 10, "tproxyd's rule back with the lan link")
    assert daemon.terminate() == 0
    assert ufw.iptables_save() == before
