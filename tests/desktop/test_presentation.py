"""The state-to-presentation logic: the extensions' pure JS module under gjs (the ES module and the
legacy copy generated from it), and the Python fallback's port of it, all against the same table
(desktop/tests/presentation_cases.json); and the two extensions' files."""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tproxy_service.toggle import presentation as P

from .conftest import CASES, EXTENSION, LEGACY_SOURCES, MAKE_LEGACY, REPO, UUID

GJS_TESTS = REPO / "desktop" / "tests" / "test_presentation.js"
# What `make install` installs of an extension (the Makefile's EXT_FILES)
EXT_FILES = ("metadata.json", "extension.js", "client.js", "presentation.js", "toggle.js", "stylesheet.css")
TABLE: dict[str, Any] = json.loads(CASES.read_text())


def gjs() -> str:
    path = shutil.which("gjs")
    if path is None:
        pytest.skip("gjs is not installed (make deps)")
    return path


def test_gjs_unit_tests_of_the_pure_module(legacy_extension: Path) -> None:
    """Every State, no links and many links, the service absent, the notifications: the ES module
    and its legacy copy each give exactly the table's output (and the words the issue names)."""
    proc = subprocess.run(
        [gjs(), "-m", str(GJS_TESTS), str(legacy_extension)], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    passed = int(last.split()[0])
    cases = len(TABLE["present"]) + len(TABLE["notifications"])
    assert last == f"{passed} passed, 0 failed" and passed >= 2 * cases
    for kind in ("es", "legacy"):
        assert sum(line.startswith(f"ok {kind}: present: ") for line in proc.stdout.splitlines()) == len(
            TABLE["present"]
        ), kind
    assert "FAIL" not in proc.stdout and proc.stderr == "", proc.stderr


def test_the_table_is_what_the_js_module_prints() -> None:
    """The checked-in table is exactly `--print`'s output: no hand edits that gjs does not agree with."""
    proc = subprocess.run([gjs(), "-m", str(GJS_TESTS), "--print"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == TABLE


@pytest.mark.parametrize("case", TABLE["present"], ids=[c["name"] for c in TABLE["present"]])
def test_python_port_presents_like_the_extension(case: dict[str, Any]) -> None:
    assert P.present(case["snapshot"]) == case["expect"]


@pytest.mark.parametrize("case", TABLE["notifications"], ids=[c["name"] for c in TABLE["notifications"]])
def test_python_port_notifies_like_the_extension(case: dict[str, Any]) -> None:
    assert P.notification_for(case["request"], case["error"], case["message"]) == case["expect"]


def _make_legacy() -> Any:
    spec = importlib.util.spec_from_file_location("make_legacy", MAKE_LEGACY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_legacy_extension_is_written_from_the_es_modules(legacy_extension: Path) -> None:
    """One source: the GNOME 43/44 extension's presentation.js, client.js and toggle.js are what
    make_legacy.py makes of the ES modules, so a change to one reaches both extensions; its other
    files are the hand-written ones in 43/, the only files checked in there."""
    make_legacy = _make_legacy()
    assert make_legacy.MODULES == ("presentation.js", "client.js", "toggle.js")
    for name in make_legacy.MODULES:
        assert (legacy_extension / name).read_text() == make_legacy.legacy_module((EXTENSION / name).read_text(), name)
    hand_written = sorted(p.name for p in LEGACY_SOURCES.iterdir())
    assert hand_written == ["extension.js", "metadata.json", "stylesheet.css"]
    for name in hand_written:
        assert (legacy_extension / name).read_text() == (LEGACY_SOURCES / name).read_text()
    assert {(p.stat().st_mode & 0o777) for p in legacy_extension.iterdir()} == {0o644}


def test_the_generator_refuses_a_stale_copy_beside_the_hand_written_files(tmp_path: Path) -> None:
    """A generated module left in 43/ would be installed instead of the ES module's conversion."""
    make_legacy = _make_legacy()
    sources = tmp_path / "43"
    shutil.copytree(LEGACY_SOURCES, sources)
    (sources / "client.js").write_text("// an old copy\n")
    make_legacy.LEGACY_DIR = sources
    with pytest.raises(ValueError, match=r"client\.js is generated from the ES module: remove it"):
        make_legacy.write_extension(tmp_path / "out")
    assert not (tmp_path / "out" / "client.js").exists()


def test_the_generator_converts_module_lines_and_nothing_else() -> None:
    convert = _make_legacy().legacy_module
    source = (
        "// x\n"
        "import Gio from 'gi://Gio';\n"
        "import * as Main from 'resource:///org/gnome/shell/ui/main.js';\n"
        "import {QuickMenuToggle, SystemIndicator} from 'resource:///org/gnome/shell/ui/quickSettings.js';\n"
        "import {Client} from './client.js';\n"
        "import * as P from './presentation.js';\n"
        "export const A = 1; // export stays in comments\n"
        "export function f() {}\n"
        "export class C {\n    m() {}\n}\n"
    )
    me = "imports.misc.extensionUtils.getCurrentExtension().imports"
    assert convert(source, "m.js") == (
        "// x\n"
        "// GENERATED from desktop/gnome-shell/45/tproxyd@tproxyd.github.io/m.js"
        " by desktop/gnome-shell/make_legacy.py:\n"
        "// do not edit (edit the ES module).\n"
        "const Gio = imports.gi.Gio;\n"
        "const Main = imports.ui.main;\n"
        "const {QuickMenuToggle, SystemIndicator} = imports.ui.quickSettings;\n"
        f"const {{Client}} = {me}.client;\n"
        f"const P = {me}.presentation;\n"
        "var A = 1; // export stays in comments\n"
        "function f() {}\n"
        "var C = class C {\n    m() {}\n};\n\n"
        "/* exported A, f, C */\n"
    )
    for bad in (
        "export default class {}",
        "export {A};",
        "import Foo from 'gi://Bar';",
        "import * as X from 'resource:///org/gnome/shell/extensions/extension.js';",
        "import X from './x.js';",
    ):
        with pytest.raises(ValueError, match="has no legacy form"):
            convert(f"// x\n{bad}\n", "m.js")
    with pytest.raises(ValueError, match="does not end with a `}` line"):
        convert("// x\nexport class C {\n    m() {}\n", "m.js")


@pytest.mark.parametrize(
    "legacy, versions",
    [(True, ["43", "44"]), (False, ["45", "46", "47", "48", "49"])],
    ids=["gnome43-44", "gnome45-49"],
)
def test_extension_files(legacy: bool, versions: list[str], legacy_extension: Path) -> None:
    """metadata.json names the directory's uuid and its GNOME versions; both extensions have the
    same files (`make install` installs one set); the legacy one is valid script JavaScript for gjs
    (a syntax error would only show once the shell loads it)."""
    extension = legacy_extension if legacy else EXTENSION
    meta = json.loads((extension / "metadata.json").read_text())
    assert meta["uuid"] == UUID == extension.name
    assert meta["shell-version"] == versions
    assert sorted(p.name for p in extension.iterdir()) == sorted(EXT_FILES)
    assert (extension / "stylesheet.css").read_text() == (legacy_extension / "stylesheet.css").read_text()
    if legacy:
        script = (
            "const {GLib} = imports.gi; for (const f of ARGV) {"
            " const [, b] = GLib.file_get_contents(f); new Function(new TextDecoder().decode(b)); }"
        )
        files = [str(path) for path in sorted(extension.glob("*.js"))]
        proc = subprocess.run([gjs(), "-c", script, *files], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def _members(node: ET.Element) -> dict[str, tuple[str, ...]]:
    """method name -> its args' (direction, type); property name -> (type, access)."""
    members: dict[str, tuple[str, ...]] = {}
    for method in node.iter("method"):
        members[method.attrib["name"]] = tuple(
            f"{a.get('direction', 'in')} {a.attrib['type']}" for a in method.iter("arg")
        )
    for prop in node.iter("property"):
        members[prop.attrib["name"]] = (prop.attrib["type"], prop.attrib["access"])
    return members


def test_the_client_speaks_the_shipped_interface() -> None:
    """client.js carries the part of io.github.Tproxyd.Manager1 it uses: every member it names is in
    the shipped introspection XML with the same signature."""
    source = (EXTENSION / "client.js").read_text()
    iface = re.search(r"^const MANAGER_IFACE = '([^']+)';$", source, re.MULTILINE)
    xml = re.search(r"^const MANAGER_XML = `(.*?)`;$", source, re.MULTILINE | re.DOTALL)
    assert iface and xml
    used = _members(ET.fromstring(xml[1].replace("${MANAGER_IFACE}", iface[1])))
    shipped_iface = (
        ET.parse(REPO / "dbus" / "io.github.Tproxyd.Manager1.xml").getroot().find(f"interface[@name='{iface[1]}']")
    )
    assert shipped_iface is not None
    shipped = _members(shipped_iface)
    assert used and {name: shipped.get(name) for name in used} == used


@pytest.mark.parametrize(
    "version, chosen", [("GNOME Shell 43.9", "43"), ("GNOME Shell 44.2", "43"), ("GNOME Shell 48.7", "45"),
                        ("GNOME Shell 49.1", "45"), (None, "45")],
)  # fmt: skip
def test_make_install_picks_the_extension_for_the_installed_shell(
    tmp_path: Path, version: str | None, chosen: str
) -> None:
    """`make install` installs the legacy extension under GNOME 43/44 and the ES-module one under
    45 and later, or where gnome-shell is not installed (`gnome-shell --version` decides)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("awk", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    if version is not None:
        fake = bin_dir / "gnome-shell"
        fake.write_text(f"#!/bin/sh\necho '{version}'\n")
        fake.chmod(0o755)
    make = shutil.which("make")
    assert make is not None
    proc = subprocess.run(
        [make, "-n", "--no-print-directory", "-C", str(REPO), "install", f"DESTDIR={tmp_path / 'root'}"],
        env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    installs = [line for line in lines if line.startswith("install -m 0644 desktop/gnome-shell/")]
    generates = [line for line in lines if "make_legacy.py" in line]
    target = f"{tmp_path / 'root'}/usr/share/gnome-shell/extensions/{UUID}"
    if chosen == "43":  # written by the generator, from the ES modules and 43/'s hand-written files
        assert not installs and generates == [f"/usr/bin/python3 desktop/gnome-shell/make_legacy.py {target}"]
    else:
        assert not generates and len(installs) == 1, proc.stdout
        sources = [f"desktop/gnome-shell/45/{UUID}/{name}" for name in EXT_FILES]
        assert installs[0].split()[3:] == [*sources, f"{target}/"]


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


# --- hand-written expectations --------------------------------------------------------------------
# presentation_cases.json is printed by the JS module it checks, so it cannot catch a wording the
# module got wrong in the first place. These are written by hand from what a user must see in the
# important states, with their own snapshots, and checked against the JS module and the Python port.


def _props(
    state: str, active: list[str], error: str = "", enabled: bool = True, policy: str = "open"
) -> dict[str, Any]:
    return {
        "Enabled": enabled,
        "Links": {"wlan0": "host"},
        "ActiveLinks": active,
        "State": state,
        "CoreState": "active",
        "FailurePolicy": policy,
        "LastError": error,
        "Version": "0.1.0",
    }


# name -> (snapshot, the fields a user sees: switch sensitive, switch on, status line, warning badge)
IMPORTANT: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "not running": (
        {"running": False, "props": None, "nmLinks": None},
        {"sensitive": False, "checked": False, "status": "tproxyd is not running", "warning": False},
    ),
    "off": (
        {"running": True, "props": _props("off", [], enabled=False), "nmLinks": None},
        {"sensitive": True, "checked": False, "status": "proxy off", "warning": False},
    ),
    "starting": (
        {"running": True, "props": _props("starting", []), "nmLinks": None},
        {"sensitive": True, "checked": True, "status": "starting", "warning": False},
    ),
    "active": (
        {"running": True, "props": _props("active", ["wlan0"]), "nmLinks": None},
        {"sensitive": True, "checked": True, "status": "active on wlan0", "warning": False},
    ),
    "degraded": (
        {"running": True, "props": _props("degraded", [], "the core is not listening"), "nmLinks": None},
        {"sensitive": True, "checked": True, "status": "core down: traffic direct", "warning": True},
    ),
    "blocked": (
        {
            "running": True,
            "props": _props("blocked", ["wlan0"], "the core is not listening", policy="closed"),
            "nmLinks": None,
        },
        {"sensitive": True, "checked": True, "status": "blocked: core down", "warning": True},
    ),
    "failed": (
        {"running": True, "props": _props("failed", [], "the kernel said no"), "nmLinks": None},
        {"sensitive": True, "checked": True, "status": "failed: the kernel said no", "warning": True},
    ),
}


def _seen(shown: dict[str, Any]) -> dict[str, Any]:
    keys = ("sensitive", "checked", "status")
    return {**{k: shown[k] for k in keys}, "warning": shown["indicator"]["warning"]}


def test_important_states_as_written_by_hand_python_port() -> None:
    assert {name: _seen(P.present(snap)) for name, (snap, _) in IMPORTANT.items()} == {
        name: want for name, (_, want) in IMPORTANT.items()
    }


def test_important_states_as_written_by_hand_js_module(tmp_path: Path) -> None:
    script = tmp_path / "present.js"
    script.write_text(
        f"import * as P from '{(EXTENSION / 'presentation.js').as_uri()}';\n"
        f"const snapshots = {json.dumps({name: snap for name, (snap, _) in IMPORTANT.items()})};\n"
        "const out = {};\n"
        "for (const [name, snap] of Object.entries(snapshots)) out[name] = P.present(snap);\n"
        "print(JSON.stringify(out));\n"
    )
    proc = subprocess.run([gjs(), "-m", str(script)], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert {name: _seen(shown[name]) for name in IMPORTANT} == {name: want for name, (_, want) in IMPORTANT.items()}
