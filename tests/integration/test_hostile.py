"""Bad input over the bus: a clear documented error, and nothing changes (kernel state, saved
state, properties); the daemon survives a flood."""

from __future__ import annotations

import difflib
from collections import Counter
from typing import Any

import pytest

from tproxy_service.bus import names

from . import harness as h
from .calls import batch, finish_flood, start_flood

pytestmark = pytest.mark.root

BAD_IFNAMES = [
    "",
    "a" * 16,  # IFNAMSIZ counts the NUL: 15 bytes at most
    "é" * 8,  # 8 characters, 16 bytes
    "eth/0",
    "eth:0",
    "eth 0",
    "eth\t0",
    "eth0\n",
    "\neth0",
    'eth0"; flush ruleset',
    ".",
    "..",
    "eth\x010",
    "eth\x7f",
    "x" * 70_000,
]
BAD_MODES = ["auto", "HOST", "host ", " lan", "lan\n", "both;", "none", "disabled", "x" * 70_000]
WRONG_SIGNATURES = [  # busctl argv after the member name
    ["EnableLink", "s", "tpdv1"],
    ["EnableLink", "sss", "tpdv1", "host", "x"],
    ["EnableLink", "ii", "1", "2"],
    ["EnableLink", "a{ss}", "1", "tpdv1", "host"],
    ["EnableLink", "v", "s", "tpdv1"],
    ["DisableLink", "as", "1", "tpdv1"],
    ["DisableLink", ""],
    ["SetEnabled", "s", "yes"],
    ["SetEnabled", "i", "1"],
    ["Reapply", "s", "x"],
    ["Reload", "b", "true"],
]
DOCUMENTED = {
    names.ERROR_INVALID_ARGUMENT,
    names.ERROR_INVALID_CONFIG,
    names.ERROR_FAILED,
    names.ERROR_ACCESS_DENIED,
    names.ERROR_BUSY,
    names.ERROR_INVALID_ARGS,
    names.ERROR_UNKNOWN_METHOD,
}


def hostile_calls() -> list[list[Any]]:
    calls: list[list[Any]] = []
    for name in BAD_IFNAMES:
        calls += [["EnableLink", "ss", [name, "host"]], ["DisableLink", "s", [name]]]
    calls += [["EnableLink", "ss", [h.LINK_B, mode]] for mode in BAD_MODES]
    return calls


def snapshot(daemon: h.Tproxyd, bus: h.PrivateBus) -> dict[str, Any]:
    return {"kernel": daemon.netns.kernel_state(), "saved": daemon.state_json(), "properties": bus.properties()}


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        if before[key] != after[key]:
            diff = difflib.unified_diff(str(before[key]).splitlines(), str(after[key]).splitlines(), lineterm="")
            raise AssertionError(f"{key} changed:\n" + "\n".join(diff))


@pytest.fixture
def busy_daemon(daemon: h.Tproxyd, bus: h.PrivateBus) -> h.Tproxyd:
    """A daemon with saved choices and a foreign table next to ours, so "unchanged" means something."""
    assert bus.call("EnableLink", "ss", [h.LINK_B, "lan"]).error is None
    foreign = "add table inet tpd_foreign; add chain inet tpd_foreign c { type filter hook input priority 0; }"
    daemon.netns.exec("nft", foreign)
    assert daemon.state_json() is not None
    return daemon


@pytest.mark.parametrize("user", [h.ROOT, h.PLAIN], ids=["root", "plain"])
def test_bad_names_and_modes_are_invalid_arguments(busy_daemon: h.Tproxyd, bus: h.PrivateBus, user: h.User) -> None:
    before = snapshot(busy_daemon, bus)
    calls = hostile_calls()
    results = batch(user, bus, calls)
    for call, result in zip(calls, results, strict=True):
        assert result["error"] == names.ERROR_INVALID_ARGUMENT, (call[0], call[2][0][:20], result)
        message = result["message"]
        assert "\n" not in message and len(message) < 200 and "Traceback" not in message, message
    assert_unchanged(before, snapshot(busy_daemon, bus))
    assert busy_daemon.alive()


def test_wrong_signatures_from_busctl(busy_daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    before = snapshot(busy_daemon, bus)
    for argv in WRONG_SIGNATURES:
        cmd = ["busctl", "call", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, *argv]
        proc = h.as_user(h.ROOT, cmd, bus.env())
        assert proc.returncode != 0, argv
        assert f"{argv[0]} takes" in proc.stderr, (argv, proc.stderr)
    unknown = h.as_user(
        h.ROOT, ["busctl", "call", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, "Frobnicate"], bus.env()
    )
    assert unknown.returncode != 0 and "no such method" in unknown.stderr
    assert_unchanged(before, snapshot(busy_daemon, bus))


def test_nft_looking_valid_name_is_data(busy_daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    """`e";flush` is a valid kernel name (printable, no '/', ':' or space): it is accepted and ends
    up as a set element, never as nft syntax; the foreign table is untouched."""
    foreign = busy_daemon.netns.exec("nft", "list", "table", "inet", "tpd_foreign").stdout
    assert bus.call("EnableLink", "ss", ['e";flush', "host"]).error is None
    assert '"e\\";flush"' in busy_daemon.netns.nft_table() or 'e";flush' in busy_daemon.netns.nft_table()
    assert busy_daemon.netns.exec("nft", "list", "table", "inet", "tpd_foreign").stdout == foreign
    assert bus.call("DisableLink", "s", ['e";flush']).error is None
    assert "flush" not in busy_daemon.netns.nft_table()


def test_flood_of_concurrent_calls(busy_daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    """1,000 concurrent calls from 10 connections (5 root sending bad input, 5 plain user sending
    valid calls): only documented errors, nothing changes, the daemon survives. (Its memory under
    repeated floods is bench/'s to measure: a ceiling depends on the machine.)"""
    before = snapshot(busy_daemon, bus)
    hostile = [*hostile_calls(), ["EnableLink", "s", [h.LINK_B]], ["SetEnabled", "s", ["yes"]]]
    valid: list[list[Any]] = [
        ["EnableLink", "ss", [h.LINK_A, "both"]],
        ["DisableLink", "s", [h.LINK_B]],
        ["SetEnabled", "b", [False]],
    ]

    def one_round() -> dict[str, int]:
        floods = [start_flood(h.ROOT, bus, 5, 100, hostile), start_flood(h.PLAIN, bus, 5, 100, valid)]
        counts: Counter[str] = Counter()
        for proc in floods:
            counts.update(finish_flood(proc)["counts"])
        return dict(counts)

    counts = one_round()
    assert sum(counts.values()) == 1000
    assert set(counts) <= DOCUMENTED, counts
    assert counts[names.ERROR_ACCESS_DENIED] + counts.get(names.ERROR_BUSY, 0) == 500  # every plain call refused
    assert busy_daemon.alive()
    assert_unchanged(before, snapshot(busy_daemon, bus))
