"""Errors a real core config provokes name the user's file, key and object, never the merged
temporary file tproxyd hands to `v2ray -test`."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tproxy_service.config import parse_config
from tproxy_service.errors import ConfigError
from tproxy_service.model import TproxySettings
from tproxy_service.proxycore.supervisor import render_checked
from tproxy_service.proxycore.v2ray_config import build_core_config, locate, render

V2RAY = Path("/usr/bin/v2ray")
VMESS_OUT = {
    "protocol": "vmess",
    "settings": {
        "vnext": [
            {"address": "198.51.100.2", "port": 10086, "users": [{"id": "0" * 8 + "-0000-4000-8000-" + "0" * 12}]}
        ]
    },
}


def test_a_string_mark_is_refused_as_not_a_number() -> None:
    user = {"outbounds": [{**VMESS_OUT, "streamSettings": {"sockopt": {"mark": "255"}}}]}
    with pytest.raises(
        ConfigError, match=r'u\.json: outbounds\[0\] sets sockopt\.mark to "255", but the mark must be a number'
    ):
        build_core_config(user, TproxySettings(), "u.json")


@pytest.mark.parametrize(
    "user",
    [
        {"outbounds": [VMESS_OUT]},
        {"log": {"loglevel": "info"}, "inbounds": [{"tag": "s", "port": 1080, "protocol": "socks", "settings": {}}],
         "outbounds": [VMESS_OUT, {"protocol": "freedom", "settings": {}}], "routing": {"rules": []}},
    ],
)  # fmt: skip
def test_every_rendered_line_has_a_path(user: dict[str, Any]) -> None:
    merged = build_core_config(user, TproxySettings(), "u.json")
    lines = render(merged).splitlines()
    for number, line in enumerate(lines, 1):
        where = locate(merged, number, "u.json")
        if line.strip().startswith('"port": 10086'):
            assert where == "outbounds[0].settings.vnext[0].port in u.json"
        if '"tag": "s"' in line:
            assert where == "inbounds[0].tag in u.json"  # after tproxyd's own two inbounds
        if '"listen": "::1"' in line:
            assert where == "listen of the inbounds entry tproxyd adds (from [tproxy])"


def _rejected(tmp_path: Path, user: dict[str, Any]) -> str:
    if not os.access(V2RAY, os.X_OK):
        pytest.skip("v2ray is not installed (make deps)")
    core = tmp_path / "client.json"
    core.write_text(json.dumps(user, indent=4))
    config = parse_config(f'[core]\nconfig = "{core}"\nbinary = "{V2RAY}"\n', "t.toml", tmp_path)
    with pytest.raises(ConfigError) as e:
        asyncio.run(render_checked(config))
    return str(e.value)


def test_core_test_errors_name_the_object_in_the_users_file(tmp_path: Path) -> None:
    user = {"log": {"loglevel": 5}, "outbounds": [VMESS_OUT]}
    message = _rejected(tmp_path, user)
    assert f"log.loglevel in {tmp_path / 'client.json'}" in message, message
    assert "at line" not in message


def test_inbound_errors_count_the_users_own_inbounds(tmp_path: Path) -> None:
    user = {"inbounds": [{"tag": 7, "port": 1080, "protocol": "socks", "settings": {}}], "outbounds": [VMESS_OUT]}
    message = _rejected(tmp_path, user)
    assert f"inbounds[0].tag in {tmp_path / 'client.json'}" in message, message


def test_a_missing_bypass_list_names_its_key_and_line(tmp_path: Path) -> None:
    text = '[tproxy]\nport = 1012\n\n[bypass]\nfiles = ["absent.txt"]\n'
    with pytest.raises(ConfigError, match=r"^t\.toml:5: bypass\.files: cannot read CIDR list file .*absent\.txt"):
        parse_config(text, "t.toml", tmp_path)


def test_routing_rules_and_outbounds_count_the_users_own_entries() -> None:
    user = {
        "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
        "routing": {"rules": [{"type": "field", "ip": ["192.0.2.1"], "outboundTag": "direct"}]},
    }
    merged = build_core_config(user, TproxySettings(), "u.json")
    assert merged["routing"]["rules"][0]["outboundTag"] != "direct", "expected tproxyd's DNS rule in front"
    lines = render(merged).splitlines()
    ip_line = next(n for n, line in enumerate(lines, 1) if '"192.0.2.1"' in line)
    assert locate(merged, ip_line, "u.json") == "routing.rules[0].ip[0] in u.json"
    freedom = next(n for n, line in enumerate(lines, 1) if '"protocol": "freedom"' in line)
    assert locate(merged, freedom, "u.json") == "outbounds[0].protocol in u.json"
    dns = next(n for n, line in enumerate(lines, 1) if '"protocol": "dns"' in line)
    assert locate(merged, dns, "u.json") == "protocol of the outbounds entry tproxyd adds (from [tproxy])"
