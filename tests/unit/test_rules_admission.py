"""The pure builder of the rule tproxyd keeps in firewalld's and ufw's input chains."""

from __future__ import annotations

from typing import Any

from tproxy_service.rules import admission as fw


def _rule(handle: int, expr: list[Any], comment: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"family": "inet", "table": "firewalld", "chain": "filter_INPUT", "handle": handle}
    rule["expr"] = expr
    if comment:
        rule["comment"] = comment
    return {"rule": rule}


FIREWALLD_OWN = _rule(4, [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established"]}}])


def _listing(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, {"chain": {"name": "filter_INPUT"}}, *rules]}


def _ours(handle: int, mark: int) -> dict[str, Any]:
    counter = {"counter": {"packets": 3, "bytes": 180}}  # as listed: counter values are not ours to match
    expr = [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": mark}}, counter, {"accept": None}]
    return _rule(handle, expr, fw.COMMENT)


def test_inserts_a_mark_accept_at_the_head_of_the_input_chain() -> None:
    batch = fw.build_sync(fw.FIREWALLD, _listing(FIREWALLD_OWN), 1)
    assert batch is not None
    commands = batch["nftables"][1:]
    assert commands == [
        {
            "insert": {
                "rule": {
                    "family": "inet",
                    "table": "firewalld",
                    "chain": "filter_INPUT",
                    "comment": fw.COMMENT,
                    "expr": [
                        {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}},
                        {"counter": None},
                        {"accept": None},
                    ],
                }
            }
        }
    ]


def test_nothing_to_do_when_our_rule_is_there() -> None:
    assert fw.build_sync(fw.FIREWALLD, _listing(_ours(9, 1), FIREWALLD_OWN), 1) is None
    assert fw.build_sync(fw.FIREWALLD, _listing(FIREWALLD_OWN), None) is None


def test_removal_deletes_only_our_rules_by_handle() -> None:
    batch = fw.build_sync(fw.FIREWALLD, _listing(_ours(9, 1), FIREWALLD_OWN, _ours(12, 1)), None)
    assert batch is not None
    handles = [c["delete"]["rule"]["handle"] for c in batch["nftables"][1:]]
    assert handles == [9, 12]


def test_another_mark_replaces_the_rule() -> None:
    batch = fw.build_sync(fw.FIREWALLD, _listing(_ours(9, 1)), 7)
    assert batch is not None
    kinds = [next(iter(c)) for c in batch["nftables"][1:]]
    assert kinds == ["delete", "insert"]
    assert batch["nftables"][2]["insert"]["rule"]["expr"][0]["match"]["right"] == 7


def test_the_batch_passes_libnftables_schema() -> None:
    import pytest

    nftables = pytest.importorskip("nftables", reason="Debian's python3-nftables is required")
    pytest.importorskip("jsonschema", reason="python3-jsonschema is required for schema validation")
    batch = fw.build_sync(fw.FIREWALLD, _listing(_ours(9, 1)), 7)
    assert nftables.Nftables().json_validate(batch)


def test_ufw_chains_are_addressed_by_their_iptables_family_and_table() -> None:
    batch = fw.build_sync(fw.UFW6, _listing(), 1)
    assert batch is not None
    rule = batch["nftables"][1]["insert"]["rule"]
    assert (rule["family"], rule["table"], rule["chain"]) == ("ip6", "filter", "ufw6-before-input")


def _docker_rule(*matches: tuple[str, str]) -> dict[str, Any]:
    expr: list[Any] = [{"match": {"op": "==", "left": {"meta": {"key": k}}, "right": v}} for k, v in matches]
    return {
        "rule": {
            "family": "ip",
            "table": "filter",
            "chain": "DOCKER-USER",
            "expr": [*expr, {"counter": None}, {"accept": None}],
        }
    }


def test_docker_forward_policy_and_docker_user_rules_are_read() -> None:
    forward = {"nftables": [{"chain": {"name": "FORWARD", "policy": "drop"}}]}
    assert fw.chain_policy(forward) == "drop"
    only_in = {"nftables": [_docker_rule(("iifname", "lan0"))]}
    both = {"nftables": [_docker_rule(("iifname", "lan0")), _docker_rule(("oifname", "lan0"))]}
    assert not fw.forward_allowed((only_in, forward), "lan0"), "replies back to the lan would still be dropped"
    assert fw.forward_allowed((both, forward), "lan0")
    assert not fw.forward_allowed((both, forward), "lan1")
    docker_own = {"nftables": [_docker_rule(("iifname", "docker0")), _docker_rule(("oifname", "docker0"))]}
    assert fw.forward_allowed(({"nftables": []}, docker_own), "docker0"), "Docker's FORWARD rules count too"
    assert fw.docker_user_fix("lan0").startswith("iptables -I DOCKER-USER -i lan0 -j ACCEPT && ")
