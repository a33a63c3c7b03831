#!/usr/bin/env python3
"""Writes the GNOME Shell 43/44 extension's shared modules from their one source, the 45+ ES modules.

GNOME 43/44 load an extension's modules with the legacy `imports`, which export a script's
top-level `var`s and functions; 45+ import ES modules. The code is the same, so only the module
lines differ, and only these forms are accepted (anything else is refused: it has no legacy
equivalent here):

    import X from 'gi://X';                                   const X = imports.gi.X;
    import * as X from 'resource:///org/gnome/shell/ui/m.js'; const X = imports.ui.m;
    import {A, B} from 'resource:///org/gnome/shell/ui/m.js'; const {A, B} = imports.ui.m;
    import * as X from './m.js';                              const X = <the extension>.imports.m;
    import {A, B} from './m.js';                              const {A, B} = <the extension>.imports.m;
    export const X = ...                                      var X = ...
    export function f(...)                                    function f(...)
    export class C {  ...  }   (the body ends at a `}` line)  var C = class C {  ...  };

The entry point, extension.js, is written by hand for each (they reach the Shell differently).

    python3 desktop/gnome-shell/make_legacy.py           write 43/.../{presentation,client,toggle}.js
    python3 desktop/gnome-shell/make_legacy.py --check   exit 1 if they are not what this writes
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
UUID = "tproxyd@tproxyd.github.io"
SOURCE_DIR = HERE / "45" / UUID
LEGACY_DIR = HERE / "43" / UUID
MODULES = ("presentation.js", "client.js", "toggle.js")
ME = "imports.misc.extensionUtils.getCurrentExtension().imports"
NAME = r"[A-Za-z_$][\w$]*"
NAMES = rf"\{{\s*{NAME}(?:\s*,\s*{NAME})*\s*\}}"
IMPORTS = (
    (re.compile(rf"^import ({NAME}) from 'gi://\1';$"), lambda m: f"const {m[1]} = imports.gi.{m[1]};"),
    (
        re.compile(rf"^import (\* as ({NAME})|{NAMES}) from 'resource:///org/gnome/shell/ui/({NAME})\.js';$"),
        lambda m: f"const {m[2] or m[1]} = imports.ui.{m[3]};",
    ),
    (
        re.compile(rf"^import (\* as ({NAME})|{NAMES}) from '\./({NAME})\.js';$"),
        lambda m: f"const {m[2] or m[1]} = {ME}.{m[3]};",
    ),
)
EXPORT = re.compile(rf"^export (const|function|class) ({NAME})\b(.*)$")


def legacy_module(source: str, name: str = "module.js") -> str:
    """The legacy-`imports` variant of the ES module `source` (`name`: for error messages)."""
    out: list[str] = []
    exported: list[str] = []
    in_class = False
    for number, line in enumerate(source.splitlines(), 1):
        converted = _convert_import(line) if line.startswith("import") else None
        if converted is not None:
            out.append(converted)
            continue
        if match := EXPORT.match(line):
            kind, symbol, rest = match.groups()
            exported.append(symbol)
            if kind == "class":
                in_class = True
                out.append(f"var {symbol} = class {symbol}{rest}")
            else:
                out.append(f"{'var' if kind == 'const' else 'function'} {symbol}{rest}")
            continue
        if re.match(r"\s*(export|import)\b", line):
            raise ValueError(f"{name}:{number}: this import or export has no legacy form: {line.strip()}")
        if in_class and line == "}":
            in_class, line = False, "};"
        out.append(line)
    if in_class:
        raise ValueError(f"{name}: an exported class does not end with a `}}` line")
    license_line, *rest = out
    header = [
        f"// GENERATED from desktop/gnome-shell/45/{UUID}/{name} by desktop/gnome-shell/make_legacy.py:",
        "// do not edit (edit the ES module).",
    ]
    body = "\n".join(rest).rstrip()
    return f"{license_line}\n" + "\n".join(header) + f"\n{body}\n\n/* exported {', '.join(exported)} */\n"


def _convert_import(line: str) -> str | None:
    for pattern, replace in IMPORTS:
        if match := pattern.match(line):
            return replace(match)
    return None


def write_extension(into: Path) -> None:
    """The complete GNOME 43/44 extension in `into` (created if missing): the hand-written files of
    LEGACY_DIR and the modules generated from SOURCE_DIR, all mode 0644."""
    into.mkdir(parents=True, exist_ok=True)
    written = {name: legacy_module((SOURCE_DIR / name).read_text(), name) for name in MODULES}
    for hand_written in sorted(LEGACY_DIR.iterdir()):
        if hand_written.name in written:  # a stale copy would silently win over the ES module
            raise ValueError(f"{hand_written} is generated from the ES module: remove it")
        written[hand_written.name] = hand_written.read_text()
    for name, text in written.items():
        target = into / name
        target.write_text(text)
        target.chmod(0o644)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        write_extension(Path(argv[1]))
    except ValueError as error:
        print(f"make_legacy.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
