"""The tests' one config renderer writes what tproxyd parses back to the same values."""

from __future__ import annotations

from pathlib import Path

from tests.tproxyd_config import render_config
from tproxy_service.config import parse_config
from tproxy_service.model import AutoPolicy, FailurePolicy, LinkMode


def test_rendered_config_parses_back(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("198.51.100.0/24\n")
    text = render_config(
        tmp_path,
        runtime_dir=tmp_path / "rt",
        tproxy={"port": 999, "failure_policy": "closed", "ipv6": False},
        bypass={"cidrs": ["192.0.2.0/24"], "files": [tmp_path / "list.txt"]},
        core={"supervise": False, "config": tmp_path / "core.json"},
        networkmanager={"enabled": True},
        policies=[{"id": "Cafe Wi-Fi", "mode": "host"}],
        links={"wlan0": "host", "br.lan": "lan", "tp-ä": "both"},
    )
    c = parse_config(text, "t.toml", tmp_path)
    assert (c.state_dir, c.runtime_dir) == (tmp_path / "state", tmp_path / "rt")
    assert (c.tproxy.port, c.tproxy.failure_policy, c.tproxy.ipv6) == (999, FailurePolicy.CLOSED, False)
    assert c.bypass.cidrs == ("192.0.2.0/24",) and c.bypass.files == (tmp_path / "list.txt",)
    assert not c.core.supervise and c.core.config == tmp_path / "core.json"
    assert c.networkmanager.auto == (AutoPolicy(LinkMode.HOST, id="Cafe Wi-Fi"),)
    assert c.link_defaults == {"wlan0": LinkMode.HOST, "br.lan": LinkMode.LAN, "tp-ä": LinkMode.BOTH}
