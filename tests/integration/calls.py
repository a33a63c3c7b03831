"""Running busclient.py (tests/integration/busclient.py) as a user, and the calls the tests make."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from . import harness as h

# One valid call per method (tpdv1 exists in the daemon's namespace).
METHOD_CALLS: dict[str, list[Any]] = {
    "EnableLink": ["EnableLink", "ss", [h.LINK_B, "lan"]],
    "DisableLink": ["DisableLink", "s", [h.LINK_A]],
    "SetEnabled": ["SetEnabled", "b", [False]],
    "Reapply": ["Reapply", "", []],
    "Reload": ["Reload", "", []],
}


def batch(user: h.User, bus: h.PrivateBus, calls: list[list[Any]]) -> list[dict[str, Any]]:
    proc = h.as_user(user, [str(h.PYTHON), str(h.BUSCLIENT), "batch"], bus.env(), input=json.dumps(calls))
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def one(user: h.User, bus: h.PrivateBus, call: list[Any]) -> dict[str, Any]:
    return batch(user, bus, [call])[0]


def interactive(user: h.User, bus: h.PrivateBus, call: list[Any]) -> dict[str, Any]:
    member, signature, args = call
    proc = h.as_user(
        user, [str(h.PYTHON), str(h.BUSCLIENT), "interactive", member, signature, json.dumps(args)], bus.env()
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def start_flood(
    user: h.User, bus: h.PrivateBus, connections: int, per_connection: int, calls: list[list[Any]]
) -> subprocess.Popen[str]:
    """busclient.py flood as `user`, started now (so several floods overlap); see finish_flood."""
    prefix = [] if user.uid == 0 else ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
    proc = subprocess.Popen(
        [*prefix, str(h.PYTHON), str(h.BUSCLIENT), "flood", str(connections), str(per_connection)],
        env={**bus.env(), "HOME": "/nonexistent"},
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(calls))
    proc.stdin.close()
    return proc


def finish_flood(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """{"counts": {error name or "ok": n}, "seconds": s}"""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(timeout) == 0, err
    result: dict[str, Any] = json.loads(out)
    return result
