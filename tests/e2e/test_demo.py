"""`make demo` is the README's first command: it must keep working and keep proving its points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from . import harness as h

pytestmark = pytest.mark.root


def test_demo_proves_every_step(lab: h.Lab) -> None:
    # `lab` only for the prerequisite checks and the main-namespace guard; the demo builds its own
    # tpm-* namespaces and removes them.
    proc = subprocess.run(
        [sys.executable, str(h.REPO / "demo" / "run_demo.py")], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAIL" not in proc.stdout
    assert proc.stdout.count("OK   proves:") >= 9
    assert "server saw 198.51.100.1" in proc.stdout  # through the core and the SOCKS proxy
    assert not [ns for ns in h.netns_list() if ns.startswith("tpm-")]
