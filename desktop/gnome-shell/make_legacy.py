#!/usr/bin/env python3
"""Writes the GNOME Shell 43/44 extension's presentation.js from the one source, the 45+ ES module.

GNOME 43/44 load an extension's modules with the legacy `imports`, which export a script's
top-level `var`s and functions; 45+ import ES modules. The logic is the same, so only the
exports differ: `export const X` becomes `var X`, `export function f` becomes `function f`.
Any other form of `export` is refused (it would have no legacy equivalent here).

    python3 desktop/gnome-shell/make_legacy.py           write 43/.../presentation.js
    python3 desktop/gnome-shell/make_legacy.py --check   exit 1 if it is not what this writes
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
UUID = "tproxyd@tproxyd.github.io"
SOURCE = HERE / "45" / UUID / "presentation.js"
LEGACY = HERE / "43" / UUID / "presentation.js"
EXPORT = re.compile(r"^export (const|function) ([A-Za-z_$][\w$]*)", re.MULTILINE)


def legacy_module(source: str) -> str:
    """The legacy-`imports` variant of the ES module `source`."""
    exported = [name for _, name in EXPORT.findall(source)]
    for number, line in enumerate(source.splitlines(), 1):
        if re.match(r"\s*(export|import)\b", line) and not EXPORT.match(line):
            raise ValueError(f"{SOURCE.name}:{number}: only `export const` and `export function` can be converted")
    body = EXPORT.sub(lambda m: f"{'var' if m[1] == 'const' else 'function'} {m[2]}", source)
    header = (
        f"// GENERATED from ../../45/{UUID}/presentation.js by desktop/gnome-shell/make_legacy.py:\n"
        "// do not edit (edit the ES module, then run the script).\n"
    )
    exports = f"/* exported {', '.join(exported)} */\n"
    license_line, rest = body.split("\n", 1)
    return f"{license_line}\n{header}{rest.rstrip()}\n\n{exports}"


def main(argv: list[str]) -> int:
    wanted = legacy_module(SOURCE.read_text())
    if argv[1:] == ["--check"]:
        if LEGACY.read_text() != wanted:
            print(f"{LEGACY} is out of date: run python3 {Path(__file__).relative_to(Path.cwd())}", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    LEGACY.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
