"""Open proxies in the user's core config: inbounds on a non-loopback address that anyone may use."""

from __future__ import annotations

from typing import Any

import pytest

from tproxy_service.proxycore.exposure import open_proxy_warnings


def config(*inbounds: dict[str, Any]) -> dict[str, Any]:
    return {"inbounds": list(inbounds), "outbounds": [{"protocol": "freedom"}]}


@pytest.mark.parametrize(
    "inbound",
    [
        {"protocol": "socks", "port": 1080},  # v2ray's default listen: every address
        {"protocol": "socks", "listen": "0.0.0.0", "port": 1080, "settings": {"auth": "noauth"}},
        {"protocol": "socks", "listen": "::", "port": 1080, "settings": {"auth": "password"}},  # no accounts
        {"protocol": "http", "listen": "192.168.1.1", "port": 8080, "settings": {"accounts": []}},
        {"protocol": "dokodemo-door", "listen": "10.0.0.1", "port": 53, "settings": {"address": "1.1.1.1"}},
        {"protocol": "mixed", "listen": "0.0.0.0", "port": 7890},
    ],
)
def test_open_inbounds_are_named(inbound: dict[str, Any]) -> None:
    (warning,) = open_proxy_warnings(config({"protocol": "vmess", "port": 1}, {**inbound, "tag": "lan"}))
    assert warning.startswith("the core config's inbounds[1] (tag 'lan') is an open proxy on every link: ")
    assert f"{inbound['protocol']} on {inbound.get('listen', 'every address')} port {inbound['port']}" in warning


@pytest.mark.parametrize(
    "inbound",
    [
        {"protocol": "socks", "listen": "127.0.0.1", "port": 1080},
        {"protocol": "http", "listen": "::1", "port": 8080},
        {"protocol": "socks", "listen": "localhost", "port": 1080},
        {"protocol": "socks", "listen": "/run/v2ray.sock"},
        {
            "protocol": "socks",
            "listen": "0.0.0.0",
            "settings": {"auth": "password", "accounts": [{"user": "a", "pass": "b"}]},
        },
        {"protocol": "http", "listen": "0.0.0.0", "settings": {"accounts": [{"user": "a", "pass": "b"}]}},
        {"protocol": "vmess", "listen": "0.0.0.0", "settings": {"clients": [{"id": "x"}]}},
        {"protocol": "shadowsocks", "port": 8388},
    ],
)
def test_loopback_or_authenticated_inbounds_are_fine(inbound: dict[str, Any]) -> None:
    assert open_proxy_warnings(config(inbound)) == ()


def test_no_user_config_and_odd_shapes() -> None:
    assert open_proxy_warnings(None) == ()
    assert open_proxy_warnings({"inbounds": "x"}) == ()
    assert open_proxy_warnings({"inbounds": [1, None]}) == ()
