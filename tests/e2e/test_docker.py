"""tproxyd beside a real dockerd in the gateway namespace: lan and host mode keep working and
Docker's rules (iptables-save) stay identical; a container's traffic from docker0 as a lan link
is proxied; Docker's FORWARD policy DROP, which drops the lan's bypassed (direct) traffic, is
reported with the DOCKER-USER rules that fix it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import PrivateBus

from . import harness as h
from .conftest import StartDaemon
from .docker import Dockerd, missing
from .neighbours import all_proxied, assert_reported, iptables_save

pytestmark = pytest.mark.root

CTR = "tpe-ctr"  # the container's network namespace, attached by name for the test clients
CONTAINER = h.Addr("172.17.0.2", "")  # Docker's default bridge: IPv4 only


def docker_rules() -> str:
    return iptables_save(h.in_ns(h.GW, "iptables-save").stdout + h.in_ns(h.GW, "ip6tables-save").stdout)


@pytest.fixture(scope="module")
def docker(lab: h.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    if problem := missing():
        pytest.skip(problem)
    tables_before = set(h.nft_tables(h.GW))
    # As on a real machine: Docker owns `ip nat`, and it finds forwarding off, so it enables it
    # and sets the FORWARD policy to DROP.
    h.in_ns(h.GW, "nft", "delete", "table", "ip", "nat", check=False)
    h.in_ns(h.GW, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    dockerd = Dockerd(tmp_path_factory.mktemp("docker"), h.GW)
    try:
        dockerd.start()
        pid = dockerd.run_container("tpe-c")
        h.run("ip", "netns", "attach", CTR, str(pid))
        yield dockerd
    finally:
        h.delete_namespace(CTR)
        dockerd.close()
        for table in set(h.nft_tables(h.GW)) - tables_before | {"ip nat"}:
            h.in_ns(h.GW, "nft", "delete", "table", *table.split(), check=False)
        h.enable_forwarding(h.GW)
        h.install_foreign_tables(h.GW)


@pytest.fixture(autouse=True)
def foreign_tables_untouched(docker: Dockerd) -> Iterator[None]:
    """Here Docker owns `ip nat` (see docker_rules); the admin's `inet filter` stays as it was."""
    before = h.foreign_listing(h.GW)["inet filter"]
    yield
    assert h.foreign_listing(h.GW)["inet filter"] == before


def test_lan_and_host_mode_leave_dockers_rules_identical(
    lab: h.Lab, docker: Dockerd, start_tproxyd: StartDaemon
) -> None:
    before = docker_rules()
    assert ":FORWARD DROP" in before and "DOCKER-USER" in before, before
    daemon = start_tproxyd()
    all_proxied(lab)
    assert docker_rules() == before, "tproxyd changed Docker's rules"
    assert daemon.terminate() == 0
    assert docker_rules() == before


def test_container_traffic_on_docker0_as_a_lan_link_is_proxied(
    lab: h.Lab, docker: Dockerd, start_tproxyd: StartDaemon, tmp_path: Path, status_bus: PrivateBus
) -> None:
    links = {h.LAN_LINK: "lan", h.UP_LINK: "host", "docker0": "lan"}
    daemon = start_tproxyd(h.TproxydConfig(tmp_path / "conf", links=links), bus_address=status_bus.address)
    # Docker turned br_netfilter on: what tproxy diverts on a bridge is lost, and tproxyd says so.
    why = "docker0 is a bridge and net.bridge.bridge-nf-call-iptables"
    daemon.wait_log(why, 10)
    fix = "sysctl -w net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0"
    assert f"turn that off: {fix}" in daemon.log_text(), daemon.log_text()[-2000:]
    assert_reported(status_bus, why, f"turn that off: {fix}")
    with pytest.raises(AssertionError, match="curl rc"):  # the report is true
        h.send("tcp", CTR, CONTAINER.v4, h.SERVER.v4)
    h.in_ns(h.GW, "sh", "-c", fix)  # the admin runs the command the report gives
    try:
        for proto in ("tcp", "udp"):
            flow = h.send(proto, CTR, CONTAINER.v4, h.SERVER.v4)
            lab.proofs.proxied(flow, expected_peer=h.GW_UP.v4)
    finally:
        h.in_ns(h.GW, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")


def test_forward_drop_is_reported_with_the_docker_user_rules(
    lab: h.Lab, docker: Dockerd, start_tproxyd: StartDaemon, status_bus: PrivateBus
) -> None:
    daemon = start_tproxyd(bus_address=status_bus.address)
    daemon.wait_log("state degraded", 10)
    log = daemon.log_text()
    fix = (
        f"iptables -I DOCKER-USER -i {h.LAN_LINK} -j ACCEPT && "
        f"iptables -I DOCKER-USER -o {h.LAN_LINK} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    why = f"Docker's FORWARD policy DROP drops what {h.LAN_LINK} sends direct"
    assert why in log and f"allow it: {fix}" in log, log[-2000:]
    assert_reported(status_bus, why, f"allow it: {fix}")
    with pytest.raises(AssertionError, match="curl rc"):  # the report is true: bypassed traffic dies
        h.send("tcp", h.CLI, h.CLIENT.v4, h.SERVER_USER_CIDR.v4)
    size = daemon.log_size()
    h.in_ns(h.GW, "sh", "-c", fix)  # the admin runs the command the report gives
    try:
        daemon.wait_log("state active", 10, after=size)
        props = status_bus.properties()
        assert (props["State"], props["LastError"]) == ("active", ""), props
        lab.proofs.direct(h.send("tcp", h.CLI, h.CLIENT.v4, h.SERVER_USER_CIDR.v4))
    finally:
        h.in_ns(h.GW, "sh", "-c", fix.replace("-I DOCKER-USER", "-D DOCKER-USER"))
