"""The authorization matrix: every method for root, for a user granted by a polkit rule, and for a
plain user; reading properties needs no authorization."""

from __future__ import annotations

import pytest

from tproxy_service.bus import names

from . import harness as h
from .calls import METHOD_CALLS, batch, interactive, one

pytestmark = pytest.mark.root


@pytest.mark.parametrize("user", [h.ROOT, h.GRANTED], ids=["root", "granted-by-rule"])
@pytest.mark.parametrize("method", list(METHOD_CALLS))
def test_allowed(daemon: h.Tproxyd, bus: h.PrivateBus, user: h.User, method: str) -> None:
    result = one(user, bus, METHOD_CALLS[method])
    assert result == {"error": None, "message": ""}
    assert daemon.alive()


@pytest.mark.parametrize("method", list(METHOD_CALLS))
def test_plain_user_denied_and_nothing_changes(daemon: h.Tproxyd, bus: h.PrivateBus, method: str) -> None:
    kernel, saved, props = daemon.netns.kernel_state(), daemon.state_json(), bus.properties()
    action = "configure" if method == "Reload" else "toggle"
    for result in (one(h.PLAIN, bus, METHOD_CALLS[method]), interactive(h.PLAIN, bus, METHOD_CALLS[method])):
        assert result["error"] == names.ERROR_ACCESS_DENIED
        assert result["message"].startswith(f"not authorized to {action} tproxyd (polkit)")
    assert daemon.netns.kernel_state() == kernel
    assert daemon.state_json() == saved
    assert bus.properties() == props


@pytest.mark.parametrize("user", [h.ROOT, h.GRANTED, h.PLAIN], ids=["root", "granted", "plain"])
def test_everyone_reads_properties(daemon: h.Tproxyd, bus: h.PrivateBus, user: h.User) -> None:
    proc = h.as_user(
        user,
        ["busctl", "--json=short", "get-property", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, "State"],
        bus.env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert '"data":"active"' in proc.stdout
    assert batch(user, bus, []) == []  # connecting is allowed
    status = h.as_user(user, [str(h.TPROXYCTL), "status", "--json"], bus.env())
    assert status.returncode == 0, status.stderr
    assert '"State": "active"' in status.stdout


def test_example_rule_lets_netdev_toggle_but_not_configure(
    daemon: h.Tproxyd, bus: h.PrivateBus, stack: h.Stack
) -> None:
    """polkit/50-tproxyd.rules.example, installed as its comment says, compiles and does what it
    says: a netdev member toggles without a password, and still may not Reload."""
    log = stack.polkit.log.read_text()
    assert "Error compiling script" not in log and "50-tproxyd.rules" not in log.replace("Loading rules", "")
    for method, call in METHOD_CALLS.items():
        result = one(h.NETDEV, bus, call)
        if method == "Reload":
            assert result["error"] == names.ERROR_ACCESS_DENIED
        else:
            assert result["error"] is None, (method, result)
