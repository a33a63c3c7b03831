"""Warnings: a core config with an inbound that is an open proxy on every link is run, logged,
shown in the Warnings property and in `tproxyctl status`, and cleared by a Reload that fixes it.
The core's systemd manager is unreachable here on purpose: only its config matters (and the real
`v2ray -test` validates it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import support

from . import harness as h
from .conftest import MakeDaemon

pytestmark = pytest.mark.root


def core_config(listen: str) -> str:
    socks = {"tag": "lan-socks", "protocol": "socks", "listen": listen, "port": 1080, "settings": {"udp": True}}
    dns = {"servers": ["192.0.2.53"]}  # a dns section of its own: no warning about DNS
    return json.dumps({"inbounds": [socks], "outbounds": [{"protocol": "freedom", "settings": {}}], "dns": dns})


def write_config(daemon: h.Tproxyd, core: Path) -> None:
    daemon.config.write_text(
        f'state_dir = "{daemon.state_dir}"\n'
        f'runtime_dir = "{daemon.workdir / "run"}"\n'
        "[core]\n"
        "supervise = true\n"
        f'config = "{core}"\n'
        f'systemd_bus = "unix:path={daemon.workdir / "no-systemd"}"\n'
        "[links]\n"
        f'{h.LINK_A} = "host"\n'
    )


def test_open_proxy_inbound_is_a_warning(make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    if missing := support.missing_tool("v2ray"):
        pytest.skip(missing)
    daemon = make_daemon(start=False)
    core = daemon.workdir / "core.json"
    core.write_text(core_config("0.0.0.0"))
    write_config(daemon, core)
    daemon.start()
    expected = (
        "the core config's inbounds[0] (tag 'lan-socks') is an open proxy on every link: "
        "socks on 0.0.0.0 port 1080 without authentication"
    )
    assert bus.properties()["Warnings"] == [expected]
    assert f"core config {core}: {expected}" in daemon.log.read_text()  # the log names the file
    status = h.as_user(h.PLAIN, [str(h.TPROXYCTL), "status"], bus.env())
    assert f"Warning:        {expected}" in status.stdout.splitlines(), status

    core.write_text(core_config("127.0.0.1"))
    assert bus.call("Reload").error is None
    assert bus.properties()["Warnings"] == []
