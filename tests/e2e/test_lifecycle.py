"""The daemon's life: reloads, links that come late, healing, stop, crash and restart, and
politeness towards other tables. Each test gets its own tproxyd."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from . import harness as h

pytestmark = pytest.mark.root

StartDaemon = Callable[..., h.Tproxyd]
ALL_KINDS = [(proto, family) for proto in ("tcp", "udp") for family in (4, 6)]
HEAL_TIMEOUT = 10  # seconds for the daemon to notice and undo outside damage
RELOAD_TIMEOUT = 5


def assert_lan_proxied(lab: h.Lab, ns: str = h.CLI, client: h.Addr = h.CLIENT) -> None:
    with lab.leaks.no_client_packets():
        for proto, family in ALL_KINDS:
            flow = h.send(proto, ns, client.of(family), h.SERVER.of(family))
            lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))


def assert_lan_direct(lab: h.Lab) -> None:
    for proto, family in ALL_KINDS:
        lab.proofs.direct(h.send(proto, h.CLI, h.CLIENT.of(family), h.SERVER.of(family)))


def assert_gateway_proxied(lab: h.Lab) -> None:
    for proto, family in ALL_KINDS:
        flow = h.send(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family))
        lab.proofs.proxied(flow, expected_peer=h.GW_UP.of(family))


def assert_gateway_direct(lab: h.Lab) -> None:
    for proto, family in ALL_KINDS:
        lab.proofs.direct(h.send(proto, h.GW, h.GW_UP.of(family), h.SERVER.of(family)))


def in_lan_links(name: str) -> bool:
    return h.set_has(h.GW, "lan_links", f'"{name}"')


# --- reload (SIGHUP) ----------------------------------------------------------------------------


def test_sighup_disabling_links_makes_their_traffic_direct(
    lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path
) -> None:
    daemon = start_tproxyd(h.TproxydConfig(tmp_path / "conf"))
    assert_lan_proxied(lab)

    daemon.reload(h.TproxydConfig(tmp_path / "conf", links={h.UP_LINK: "host"}))
    h.wait_until(lambda: not in_lan_links(h.LAN_LINK), RELOAD_TIMEOUT, f"{h.LAN_LINK} out of lan_links")
    assert_lan_direct(lab)
    assert_gateway_proxied(lab)  # per link: the other link is still on

    daemon.reload(h.TproxydConfig(tmp_path / "conf", links={}))
    h.wait_until(
        lambda: not h.set_has(h.GW, "host_links", f'"{h.UP_LINK}"'), RELOAD_TIMEOUT, f"{h.UP_LINK} out of host_links"
    )
    assert_gateway_direct(lab)

    daemon.reload(h.TproxydConfig(tmp_path / "conf"))
    h.wait_until(lambda: in_lan_links(h.LAN_LINK), RELOAD_TIMEOUT, f"{h.LAN_LINK} back in lan_links")
    assert_lan_proxied(lab)


def test_sighup_with_bad_config_keeps_running_state(lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path) -> None:
    config = h.TproxydConfig(tmp_path / "conf")
    daemon = start_tproxyd(config)
    applied = h.kernel_state(h.GW)
    offset = daemon.log_size()
    config.path.write_text(config.render().replace(f"port = {h.TPROXY_PORT}", 'port = "not a port"'))
    daemon.reload()
    daemon.wait_log("config error", RELOAD_TIMEOUT, after=offset)
    assert daemon.running
    assert h.kernel_state(h.GW) == applied
    assert_lan_proxied(lab)


def test_sighup_rereads_bypass_file_and_dns_policy(lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path) -> None:
    daemon = start_tproxyd(h.TproxydConfig(tmp_path / "conf"))
    dns = h.send("udp", h.CLI, h.CLIENT.v4, h.ROUTER.v4, h.DNS_PORT)
    lab.proofs.proxied(dns, expected_peer=h.GW_UP.v4)

    more_bypass = (*h.LIST_FILE_CIDRS, f"{h.SERVER.v4}/32", f"{h.SERVER.v6}/128")
    daemon.reload(h.TproxydConfig(tmp_path / "conf", dns_hijack="off", list_file_cidrs=more_bypass))
    h.wait_until(lambda: h.set_has(h.GW, "bypass4", h.SERVER.v4), RELOAD_TIMEOUT, "the server in bypass4")
    assert_lan_direct(lab)  # the list file was re-read
    for proto, family in ALL_KINDS:  # dns_hijack off: the local resolver is just a local subnet
        lab.proofs.direct(h.send(proto, h.CLI, h.CLIENT.of(family), h.ROUTER.of(family), h.DNS_PORT))


# --- links that appear later --------------------------------------------------------------------


def test_link_configured_before_it_exists_is_proxied_when_created(
    lab: h.Lab, start_tproxyd: StartDaemon, late_client: Callable[[], None], tmp_path: Path
) -> None:
    links = {h.LAN_LINK: "lan", h.UP_LINK: "host", h.LATE_LINK: "lan"}
    start_tproxyd(h.TproxydConfig(tmp_path / "conf", links=links))
    assert h.in_ns(h.GW, "ip", "link", "show", h.LATE_LINK, check=False).returncode != 0
    assert in_lan_links(h.LATE_LINK), "sets match by name: an absent link belongs in the set already"

    late_client()
    # No waiting on the daemon: the set element matches the new link by name from its first packet.
    assert_lan_proxied(lab, ns=h.LATE_CLI, client=h.LATE_CLIENT)
    h.wait_until(lambda: h.set_has(h.GW, "local4", h.GW_LATE.v4), RELOAD_TIMEOUT, "the new LAN in local4")


# --- healing ------------------------------------------------------------------------------------


def _delete_table() -> None:
    h.in_ns(h.GW, "nft", "delete", "table", "inet", "tproxyd")


def _flush_ruleset() -> None:
    h.in_ns(h.GW, "nft", "flush", "ruleset")  # only ever inside tpe-gw


def _delete_fwmark_rules() -> None:
    for family in ("-4", "-6"):
        h.in_ns(h.GW, "ip", family, "rule", "del", "fwmark", str(h.FWMARK), "lookup", str(h.ROUTE_TABLE))


def _flush_route_table() -> None:
    for family in ("-4", "-6"):
        h.in_ns(h.GW, "ip", family, "route", "flush", "table", str(h.ROUTE_TABLE))


def _everything_at_once() -> None:
    _delete_table()
    _delete_fwmark_rules()
    _flush_route_table()


DAMAGE = {
    "delete-table": _delete_table,
    "flush-ruleset": pytest.param(_flush_ruleset, marks=pytest.mark.flushes_foreign_tables),
    "delete-fwmark-rules": _delete_fwmark_rules,
    "flush-route-table": _flush_route_table,
    "all-of-it": _everything_at_once,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_heals_outside_damage(
    lab: h.Lab, start_tproxyd: StartDaemon, damage: Callable[[], None], tmp_path: Path
) -> None:
    daemon = start_tproxyd(h.TproxydConfig(tmp_path / "conf"))
    applied = h.kernel_state(h.GW)
    damage()  # each command fails loudly if there was nothing to damage
    h.wait_until(lambda: h.kernel_state(h.GW).complete, HEAL_TIMEOUT, "tproxyd to restore its table, rules, routes")
    healed = h.kernel_state(h.GW)
    assert healed.table_listing == applied.table_listing
    assert (healed.rules4, healed.rules6, healed.routes4, healed.routes6) == (
        applied.rules4,
        applied.rules6,
        applied.routes4,
        applied.routes6,
    )
    assert daemon.running
    assert_lan_proxied(lab)
    assert_gateway_proxied(lab)
    if damage is _flush_ruleset:
        # tproxyd owns one table: it restores that one and never recreates other people's tables
        # (Docker's nat, the admin's filter) -- whoever flushed the ruleset owns that outcome.
        assert all(listing is None for listing in h.foreign_listing(h.GW).values())
        assert healed.tables == ("inet tproxyd",)


# --- stop, crash, restart -----------------------------------------------------------------------


def test_sigterm_removes_everything_of_ours(lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path) -> None:
    daemon = start_tproxyd(h.TproxydConfig(tmp_path / "conf"))
    assert h.kernel_state(h.GW).complete
    assert daemon.terminate() == 0
    state = h.kernel_state(h.GW)
    assert state.absent, f"left behind after SIGTERM: {state}"
    assert "inet tproxyd" not in state.tables
    assert_lan_direct(lab)


def test_sigkill_keeps_rules_and_restart_leaves_one_copy(
    lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path
) -> None:
    config = h.TproxydConfig(tmp_path / "conf")
    first = start_tproxyd(config)
    clean = h.kernel_state(h.GW)

    first.kill()
    assert h.kernel_state(h.GW) == clean, "a crash must leave the rules in place"
    assert_lan_proxied(lab)  # traffic keeps flowing as configured while the daemon is down
    # A stale copy at another priority, as a run with another rule_priority would leave (the
    # kernel refuses an exact duplicate here, so this is the duplicate that can exist).
    for family in ("-4", "-6"):
        h.in_ns(
            h.GW,
            "ip",
            family,
            "rule",
            "add",
            "fwmark",
            str(h.FWMARK),
            "lookup",
            str(h.ROUTE_TABLE),
            "priority",
            str(h.RULE_PRIORITY - 1),
        )

    start_tproxyd(config)
    h.wait_until(lambda: h.kernel_state(h.GW) == clean, RELOAD_TIMEOUT, "exactly one copy of every rule and route")
    assert_lan_proxied(lab)
    assert_gateway_proxied(lab)


# --- politeness ---------------------------------------------------------------------------------


def test_foreign_tables_identical_through_a_whole_lifecycle(
    lab: h.Lab, start_tproxyd: StartDaemon, tmp_path: Path
) -> None:
    """Docker's nat table (no counters: compared byte for byte) and an admin's filter table
    (counter values stripped) survive start, reload, healing, crash, restart and stop unchanged."""
    nat_before = h.nft_table_listing(h.GW, "ip", "nat")
    before = h.foreign_listing(h.GW)
    config = h.TproxydConfig(tmp_path / "conf")

    daemon = start_tproxyd(config)
    assert_lan_proxied(lab)
    daemon.reload(h.TproxydConfig(tmp_path / "conf", cidrs=(*h.USER_CIDRS, f"{h.SERVER.v4}/32")))
    h.wait_until(lambda: h.set_has(h.GW, "bypass4", h.SERVER.v4), RELOAD_TIMEOUT, "the reload applied")
    _delete_table()
    h.wait_until(lambda: h.kernel_state(h.GW).complete, HEAL_TIMEOUT, "tproxyd to restore its table")
    daemon.kill()
    daemon = start_tproxyd(config)
    assert_lan_proxied(lab)
    assert daemon.terminate() == 0

    assert h.nft_table_listing(h.GW, "ip", "nat") == nat_before
    assert h.foreign_listing(h.GW) == before
    assert sorted(h.nft_tables(h.GW)) == ["inet filter", "ip nat"]
