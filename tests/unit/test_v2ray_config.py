from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tproxy_service.errors import ConfigError
from tproxy_service.model import DnsHijack, TproxySettings
from tproxy_service.proxycore.dns_route import DEFAULT_DNS, DNS_OUTBOUND_TAG, dns_warnings
from tproxy_service.proxycore.v2ray_config import (
    INBOUND_TAGS,
    build_core_config,
    parse_user_config,
    render,
)

S = TproxySettings()


def test_default_config_gets_inbounds_and_mark() -> None:
    cfg = build_core_config(None, S, "default")
    tags = [i["tag"] for i in cfg["inbounds"]]
    assert tags == [INBOUND_TAGS[4], INBOUND_TAGS[6]]
    v4, v6 = cfg["inbounds"]
    assert (v4["listen"], v4["port"], v6["listen"]) == ("127.0.0.1", 1012, "::1")
    assert v4["streamSettings"]["sockopt"]["tproxy"] == "tproxy"
    assert v4["settings"] == {"network": "tcp,udp", "followRedirect": True}
    assert v4["sniffing"]["enabled"] is True
    assert all(o["streamSettings"]["sockopt"]["mark"] == 255 for o in cfg["outbounds"])


def test_user_sockopt_fields_are_kept_and_inbounds_appended() -> None:
    user = {
        "inbounds": [{"tag": "socks", "port": 1080, "protocol": "socks"}],
        "outbounds": [
            {"protocol": "vmess", "streamSettings": {"network": "ws", "sockopt": {"tcpFastOpen": True}}},
            {"protocol": "freedom", "streamSettings": {"sockopt": {"mark": 255}}},
        ],
        "routing": {"rules": []},
    }
    cfg = build_core_config(user, S, "u.json")
    assert [i["tag"] for i in cfg["inbounds"]][2:] == ["socks"]
    assert cfg["outbounds"][0]["streamSettings"] == {
        "network": "ws",
        "sockopt": {"tcpFastOpen": True, "mark": 255},
    }
    assert cfg["routing"]["rules"][1:] == []  # the user's (none) after tproxyd's DNS route
    assert "mark" not in user["outbounds"][0]["streamSettings"]["sockopt"]  # input not mutated


def test_ipv4_only_and_tcp_only() -> None:
    cfg = build_core_config(None, TproxySettings(ipv6=False, udp=False), "d", sniffing=False)
    (inbound,) = cfg["inbounds"]
    assert inbound["settings"]["network"] == "tcp" and "sniffing" not in inbound


@pytest.mark.parametrize(
    ("user", "message"),
    [
        (
            {"inbounds": [{"port": 1012, "protocol": "socks"}], "outbounds": [{}]},
            r"inbounds\[0\] binds port 1012",
        ),
        ({"inbounds": [{"port": "1000-2000"}], "outbounds": [{}]}, r"binds port 1012"),
        ({"inbounds": [{"tag": "tproxyd-tproxy6", "port": 1}], "outbounds": [{}]}, r"tag 'tproxyd-tproxy6'"),
        (
            {"outbounds": [{"streamSettings": {"sockopt": {"mark": 7}}}]},
            r"outbounds\[0\] sets sockopt.mark 7",
        ),
        ({"outbounds": [{"tag": "tproxyd-dns", "protocol": "freedom"}]}, r"outbounds\[0\] uses the tag 'tproxyd-dns'"),
        ({"outbounds": [{}], "routing": {"rules": {}}}, r"routing\.rules must be a JSON array"),
        ({"outbounds": []}, r"no outbounds"),
        ({"outbounds": "direct"}, r"must be JSON arrays"),
    ],
)
def test_conflicts_are_refused(user: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_core_config(user, S, "u.json")


def test_parse_errors_name_file_and_line() -> None:
    with pytest.raises(ConfigError, match=r"u\.json:3: invalid JSON"):
        parse_user_config('{\n "log": {},\n "outbounds": [,]\n}', "u.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_user_config("[]", "u.json")


def test_render_is_stable() -> None:
    assert render(build_core_config(None, S, "d")) == render(build_core_config(None, S, "d"))


# --- tproxyd's DNS route: golden configs, each accepted by the real v2ray ---------------------------

GOLDEN = Path(__file__).parent / "golden" / "core"
REGEN = os.environ.get("TPROXYD_REGEN_GOLDEN") == "1"
V2RAY = Path("/usr/bin/v2ray")
_DIRECT = {"tag": "direct", "protocol": "freedom", "settings": {}}
_BLOCK = {"tag": "block", "protocol": "blackhole", "settings": {}}
_SPLIT_DNS = {"servers": [{"address": "192.168.1.1", "domains": ["domain:lan"]}, "9.9.9.9"]}
_USER_DNS_ROUTE = {  # the classic guide's own: a dns outbound and a rule for port 53
    "outbounds": [_DIRECT, {"tag": "dns-out", "protocol": "dns"}],
    "routing": {"rules": [{"type": "field", "inboundTag": ["tproxyd-tproxy4"], "port": 53, "outboundTag": "dns-out"}]},
    "dns": _SPLIT_DNS,
}
CORE_SCENARIOS: dict[str, tuple[dict[str, Any] | None, TproxySettings]] = {
    "builtin": (None, S),
    "user_without_dns_section": (
        {
            "outbounds": [_DIRECT, _BLOCK],
            "routing": {"rules": [{"type": "field", "ip": ["192.0.2.0/24"], "outboundTag": "block"}]},
        },
        S,
    ),
    "user_dns_section": ({"outbounds": [_DIRECT], "dns": _SPLIT_DNS}, S),
    "user_routes_dns": (_USER_DNS_ROUTE, S),
    "dns_hijack_off": ({"outbounds": [_DIRECT], "dns": _SPLIT_DNS}, TproxySettings(dns_hijack=DnsHijack.OFF)),
}


def _built(name: str) -> dict[str, Any]:
    user, settings = CORE_SCENARIOS[name]
    return build_core_config(user, settings, f"{name}.json")


@pytest.mark.parametrize("name", sorted(CORE_SCENARIOS))
def test_core_config_matches_golden(name: str) -> None:
    path = GOLDEN / f"{name}.json"
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(render(_built(name)))
    assert _built(name) == json.loads(path.read_text()), f"{name}: core config differs from {path}"


@pytest.mark.parametrize("name", sorted(CORE_SCENARIOS))
def test_golden_core_config_passes_v2ray_test(name: str) -> None:
    if not V2RAY.exists():
        pytest.skip(f"{V2RAY} is required (Debian package v2ray)")
    proc = subprocess.run(
        [str(V2RAY), "-test", "-config", str(GOLDEN / f"{name}.json")], capture_output=True, text=True
    )
    assert proc.returncode == 0, f"v2ray -test refused {name}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def _dns_rule(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in cfg.get("routing", {}).get("rules", []) if r.get("outboundTag") == DNS_OUTBOUND_TAG]


def test_dns_route_comes_first_and_its_outbound_carries_the_core_mark() -> None:
    cfg = _built("user_without_dns_section")
    first = cfg["routing"]["rules"][0]
    assert first == {"type": "field", "inboundTag": ["tproxyd-tproxy4", "tproxyd-tproxy6"], "port": 53,
                     "outboundTag": DNS_OUTBOUND_TAG}  # fmt: skip
    assert cfg["routing"]["rules"][1]["outboundTag"] == "block"  # the user's rules follow, in order
    (dns_out,) = [o for o in cfg["outbounds"] if o["tag"] == DNS_OUTBOUND_TAG]
    assert dns_out["protocol"] == "dns" and dns_out["streamSettings"]["sockopt"]["mark"] == S.core_mark
    assert cfg["outbounds"][0]["tag"] == "direct", "the first outbound stays the default one"
    assert cfg["dns"] == DEFAULT_DNS
    ipv4_only = build_core_config(None, TproxySettings(ipv6=False), "d")
    assert _dns_rule(ipv4_only)[0]["inboundTag"] == ["tproxyd-tproxy4"]


def test_user_dns_section_and_user_dns_route_are_respected() -> None:
    assert _built("user_dns_section")["dns"] == _SPLIT_DNS and _dns_rule(_built("user_dns_section"))
    own = _built("user_routes_dns")
    assert not _dns_rule(own) and DNS_OUTBOUND_TAG not in [o["tag"] for o in own["outbounds"]]
    assert own["routing"] == _USER_DNS_ROUTE["routing"] and own["dns"] == _SPLIT_DNS
    off = _built("dns_hijack_off")
    assert not _dns_rule(off) and DNS_OUTBOUND_TAG not in [o["tag"] for o in off["outbounds"]]


@pytest.mark.parametrize(
    "rule",
    [
        {"port": "53", "outboundTag": "direct"},
        {"port": "1-1024", "network": "udp", "outboundTag": "direct"},
        {"port": "443,53", "inboundTag": ["tproxyd-tproxy6", "socks"], "outboundTag": "direct"},
        {"inboundTag": ["tproxyd-tproxy4"], "outboundTag": "my-dns"},  # to a dns outbound, any port
    ],
)
def test_what_counts_as_the_user_routing_dns(rule: dict[str, Any]) -> None:
    user = {"outbounds": [_DIRECT, {"tag": "my-dns", "protocol": "dns"}], "routing": {"rules": [rule]}}
    assert not _dns_rule(build_core_config(user, S, "u.json"))


def test_rules_for_other_inbounds_or_ports_do_not_count() -> None:
    for rule in (
        {"port": 53, "inboundTag": ["socks"], "outboundTag": "direct"},
        {"port": "80,443", "outboundTag": "direct"},
    ):
        assert _dns_rule(build_core_config({"outbounds": [_DIRECT], "routing": {"rules": [rule]}}, S, "u.json"))


def test_dns_warnings() -> None:
    tags = ["tproxyd-tproxy4", "tproxyd-tproxy6"]
    (missing,) = dns_warnings({"outbounds": [_DIRECT]}, S, tags)
    assert "no dns section" in missing and "1.1.1.1" in missing
    (system,) = dns_warnings(
        {"outbounds": [_DIRECT], "dns": {"servers": ["localhost", {"address": "localhost"}]}}, S, tags
    )
    assert "system resolver" in system
    assert dns_warnings({"outbounds": [_DIRECT], "dns": {}}, S, tags)
    assert dns_warnings({"outbounds": [_DIRECT], "dns": _SPLIT_DNS}, S, tags) == ()
    assert dns_warnings(None, S, tags) == (), "the built-in config is tproxyd's own choice: nothing to warn about"
    assert dns_warnings(_USER_DNS_ROUTE | {"dns": None}, S, tags) == ()  # the user's own route: their business
    assert dns_warnings({"outbounds": [_DIRECT]}, TproxySettings(dns_hijack=DnsHijack.OFF), tags) == ()
