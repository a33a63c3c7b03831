"""The state-to-presentation logic: the extension's pure JS module under gjs, and the Python
fallback's port of it, both against the same table (desktop/tests/presentation_cases.json)."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
from typing import Any

import pytest

from tproxy_service.toggle import presentation as P

from .conftest import CASES, EXTENSION, REPO, UUID

GJS_TESTS = REPO / "desktop" / "tests" / "test_presentation.js"
TABLE: dict[str, Any] = json.loads(CASES.read_text())


def gjs() -> str:
    path = shutil.which("gjs")
    if path is None:
        pytest.skip("gjs is not installed (make deps)")
    return path


def test_gjs_unit_tests_of_the_pure_module() -> None:
    """Every State, no links and many links, the service absent, the notifications: the JS
    module gives exactly the table's output (and the words the issue names)."""
    proc = subprocess.run([gjs(), str(GJS_TESTS)], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    passed = int(last.split()[0])
    assert last == f"{passed} passed, 0 failed" and passed >= len(TABLE["present"]) + len(TABLE["notifications"])
    assert "FAIL" not in proc.stdout and proc.stderr == "", proc.stderr


def test_the_table_is_what_the_js_module_prints() -> None:
    """The checked-in table is exactly `--print`'s output: no hand edits that gjs does not agree with."""
    proc = subprocess.run([gjs(), str(GJS_TESTS), "--print"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == TABLE


@pytest.mark.parametrize("case", TABLE["present"], ids=[c["name"] for c in TABLE["present"]])
def test_python_port_presents_like_the_extension(case: dict[str, Any]) -> None:
    assert P.present(case["snapshot"]) == case["expect"]


@pytest.mark.parametrize("case", TABLE["notifications"], ids=[c["name"] for c in TABLE["notifications"]])
def test_python_port_notifies_like_the_extension(case: dict[str, Any]) -> None:
    assert P.notification_for(case["request"], case["error"], case["message"]) == case["expect"]


def test_extension_files() -> None:
    """metadata.json names the directory's uuid and GNOME 43/44; extension.js and the pure module
    are valid JavaScript for gjs (a syntax error would only show once the shell loads them)."""
    meta = json.loads((EXTENSION / "metadata.json").read_text())
    assert meta["uuid"] == UUID == EXTENSION.name
    assert meta["shell-version"] == ["43", "44"]
    for name in ("extension.js", "presentation.js", "stylesheet.css"):
        assert (EXTENSION / name).is_file()
    script = (
        "const {GLib} = imports.gi; for (const f of ARGV) {"
        " const [, b] = GLib.file_get_contents(f); new Function(new TextDecoder().decode(b)); }"
    )
    files = [str(EXTENSION / "extension.js"), str(EXTENSION / "presentation.js")]
    proc = subprocess.run([gjs(), "-c", script, *files], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_fallback_desktop_file() -> None:
    """desktop/tproxyd-toggle.desktop starts the console script pyproject.toml installs, with a
    theme icon the toggle itself uses."""
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # type: ignore[assignment,method-assign]
    entry.read(REPO / "desktop" / "tproxyd-toggle.desktop")
    section = entry["Desktop Entry"]
    assert section["Type"] == "Application"
    assert section["Exec"] == "tproxyd-toggle"
    assert 'tproxyd-toggle = "tproxy_service.toggle.main:main"' in (REPO / "pyproject.toml").read_text()
    assert section["Icon"] in P.ICONS.values()
    assert section["Name"] == P.HEADER_TITLE
