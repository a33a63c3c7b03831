"""failure_policy = "closed" keeps blocking after a stop (the e2e tier proves it with traffic);
what releases the kept table, rules and routes: `tproxyctl off`, DisableLink, `tproxyd --release`.
(Under "open" a stop leaves nothing: tests/e2e/test_lifecycle.py.)"""

from __future__ import annotations

import pytest

from . import harness as h
from .conftest import MakeDaemon

pytestmark = pytest.mark.root

CLOSED = '[tproxy]\nfailure_policy = "closed"'


def _kept(daemon: h.Tproxyd) -> bool:
    state = daemon.netns.kernel_state()
    return "table inet tproxyd" in state and "lookup 100" in state and "local default dev lo" in state


def _released(daemon: h.Tproxyd) -> bool:
    state = daemon.netns.kernel_state()
    return "tproxyd" not in state and "lookup 100" not in state and "dev lo" not in state


def test_closed_stop_keeps_everything_until_off(make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    daemon = make_daemon(links={h.LINK_A: "host"}, extra=CLOSED)
    before = daemon.netns.kernel_state()
    assert daemon.stop() == 0
    assert daemon.netns.kernel_state() == before, "closed: a stop keeps the table, rules and routes"
    assert "keeps table inet tproxyd" in daemon.log.read_text()
    daemon.start()  # takes it over
    assert daemon.netns.kernel_state() == before
    tproxyctl = h.as_user(h.ROOT, [str(h.VENV_BIN / "tproxyctl"), "off"], bus.env())
    assert tproxyctl.returncode == 0, tproxyctl.stderr
    assert _released(daemon)
    assert daemon.stop() == 0
    assert _released(daemon)


def test_closed_disable_link_releases(make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    daemon = make_daemon(links={h.LINK_A: "host"}, extra=CLOSED)
    assert daemon.stop() == 0 and _kept(daemon)
    daemon.start()
    assert bus.call("DisableLink", "s", [h.LINK_A]).error is None
    assert _released(daemon)


def test_release_removes_what_a_stopped_closed_tproxyd_kept(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(links={h.LINK_A: "both"}, extra=CLOSED)
    assert daemon.stop() == 0 and _kept(daemon)
    out = daemon.netns.exec(str(h.TPROXYD), "--config", str(daemon.config), "--release")
    assert "released" in out.stdout
    assert _released(daemon)
