"""nm_policy (pure): manual choices, auto mode and [[networkmanager.auto]] policies over
NetworkManager facts -> the links to proxy."""

from __future__ import annotations

from tproxy_service.model import AutoPolicy, LinkMode, NetworkManagerSettings, NmConnection, NmFacts
from tproxy_service.nm_policy import effective_links, matches, policy_holds, prune_suppressed

CAFE = NmConnection("wlan0", "wifi", "Cafe", "11111111-1111-1111-1111-111111111111", shared=False)
HOTSPOT = NmConnection("wlan1", "wifi", "Hotspot", "22222222-2222-2222-2222-222222222222", shared=True)
OFFICE = NmConnection("eth0", "ethernet", "Office", "33333333-3333-3333-3333-333333333333", shared=False)
LO = NmConnection("lo", "loopback", "lo", "44444444-4444-4444-4444-444444444444", shared=False, external=True)
NM = NmFacts(running=True, connections=(CAFE, HOTSPOT, OFFICE, LO))


def settings(*policies: AutoPolicy, enabled: bool = True) -> NetworkManagerSettings:
    return NetworkManagerSettings(enabled=enabled, auto=policies)


def test_every_given_criterion_must_match() -> None:
    assert matches(AutoPolicy(LinkMode.HOST, id="Cafe"), CAFE)
    assert matches(AutoPolicy(LinkMode.HOST, uuid=CAFE.uuid), CAFE)
    assert matches(AutoPolicy(LinkMode.HOST, type="wifi", shared=False), CAFE)
    assert not matches(AutoPolicy(LinkMode.HOST, type="wifi", shared=False), HOTSPOT)
    assert not matches(AutoPolicy(LinkMode.HOST, id="Cafe", type="ethernet"), CAFE)
    assert not matches(AutoPolicy(LinkMode.HOST, id="cafe"), CAFE)  # ids are exact


def test_policies_hold_links_first_entry_wins() -> None:
    policies = settings(
        AutoPolicy(LinkMode.BOTH, id="Office"),
        AutoPolicy(None, type="wifi"),  # auto: lan when shared
        AutoPolicy(LinkMode.HOST, type="ethernet"),
    )
    holds = policy_holds(policies, NM)
    assert {name: (h.mode, h.entry) for name, h in holds.items()} == {
        "eth0": (LinkMode.BOTH, 0),
        "wlan0": (LinkMode.HOST, 1),
        "wlan1": (LinkMode.LAN, 1),
    }


def test_external_connections_and_disabled_following_never_match() -> None:
    assert policy_holds(settings(AutoPolicy(LinkMode.HOST, id="lo")), NM) == {}
    assert policy_holds(settings(AutoPolicy(LinkMode.HOST, id="Cafe"), enabled=False), NM) == {}


def test_manual_choices_win_and_auto_resolves_from_the_connection() -> None:
    policies = settings(AutoPolicy(LinkMode.HOST, type="wifi"))
    manual = {"wlan1": None, "eth9": None, "wlan0": LinkMode.BOTH}
    assert effective_links(manual, policies, NM) == {
        "eth9": LinkMode.HOST,  # no connection on it: auto is host
        "wlan0": LinkMode.BOTH,  # manual beats the policy
        "wlan1": LinkMode.LAN,  # auto on a shared connection
    }
    # Without NetworkManager (or not following it) auto is host.
    assert effective_links({"wlan1": None}, policies, NmFacts()) == {"wlan1": LinkMode.HOST}
    assert effective_links({"wlan1": None}, settings(enabled=False), NM) == {"wlan1": LinkMode.HOST}


def test_auto_re_resolves_when_the_connection_changes() -> None:
    manual = {"wlan1": None}
    hotspot_gone = NmFacts(running=True, connections=(CAFE,))
    on_cafe = NmFacts(running=True, connections=(NmConnection("wlan1", "wifi", "Cafe", CAFE.uuid, shared=False),))
    assert effective_links(manual, settings(), NM) == {"wlan1": LinkMode.LAN}
    assert effective_links(manual, settings(), hotspot_gone) == {"wlan1": LinkMode.HOST}
    assert effective_links(manual, settings(), on_cafe) == {"wlan1": LinkMode.HOST}


def test_deactivated_connection_releases_its_link() -> None:
    policies = settings(AutoPolicy(LinkMode.HOST, id="Cafe"))
    assert effective_links({}, policies, NM) == {"wlan0": LinkMode.HOST}
    assert effective_links({}, policies, NmFacts(running=True, connections=(HOTSPOT,))) == {}


def test_suppressed_hold_lasts_until_the_connection_leaves() -> None:
    policies = settings(AutoPolicy(LinkMode.HOST, id="Cafe"))
    suppressed = frozenset({("wlan0", CAFE.uuid)})
    assert effective_links({}, policies, NM, suppressed) == {}
    assert prune_suppressed(suppressed, NM) == suppressed
    gone = NmFacts(running=True, connections=(HOTSPOT,))
    assert prune_suppressed(suppressed, gone) == frozenset()
