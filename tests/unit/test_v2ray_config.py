from __future__ import annotations

import pytest

from tproxy_service.core.v2ray_config import (
    INBOUND_TAGS,
    build_core_config,
    parse_user_config,
    render,
)
from tproxy_service.errors import ConfigError
from tproxy_service.model import TproxySettings

S = TproxySettings()


def test_default_config_gets_inbounds_and_mark() -> None:
    cfg = build_core_config(None, S, "default")
    tags = [i["tag"] for i in cfg["inbounds"]]
    assert tags == [INBOUND_TAGS[4], INBOUND_TAGS[6]]
    v4, v6 = cfg["inbounds"]
    assert (v4["listen"], v4["port"], v6["listen"]) == ("127.0.0.1", 12345, "::1")
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
    assert cfg["routing"] == {"rules": []}
    assert "mark" not in user["outbounds"][0]["streamSettings"]["sockopt"]  # input not mutated


def test_ipv4_only_and_tcp_only() -> None:
    cfg = build_core_config(None, TproxySettings(ipv6=False, udp=False), "d", sniffing=False)
    (inbound,) = cfg["inbounds"]
    assert inbound["settings"]["network"] == "tcp" and "sniffing" not in inbound


@pytest.mark.parametrize(
    ("user", "message"),
    [
        (
            {"inbounds": [{"port": 12345, "protocol": "socks"}], "outbounds": [{}]},
            r"inbounds\[0\] binds port 12345",
        ),
        ({"inbounds": [{"port": "12000-13000"}], "outbounds": [{}]}, r"binds port 12345"),
        ({"inbounds": [{"tag": "tproxyd-tproxy6", "port": 1}], "outbounds": [{}]}, r"tag 'tproxyd-tproxy6'"),
        (
            {"outbounds": [{"streamSettings": {"sockopt": {"mark": 7}}}]},
            r"outbounds\[0\] sets sockopt.mark 7",
        ),
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
