"""One renderer of tproxyd config files, for every test tier, bench/ and demo/: each passes the
values it cares about; everything else keeps tproxyd's own defaults (model.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    """bool, int, str, Path and lists of them (a JSON string is a TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _table(header: str, values: Mapping[str, Any]) -> list[str]:
    return [header, *(f"{_key(key)} = {toml_value(value)}" for key, value in values.items())]


def render_config(
    workdir: Path,
    *,
    runtime_dir: Path | None = None,
    links: Mapping[str, str] | None = None,
    tproxy: Mapping[str, Any] | None = None,
    bypass: Mapping[str, Any] | None = None,
    core: Mapping[str, Any] | None = None,
    networkmanager: Mapping[str, Any] | None = None,
    policies: Sequence[Mapping[str, Any]] = (),
    extra: str = "",
) -> str:
    """state_dir is `workdir`/state, runtime_dir `workdir`/run unless given; `policies` are the
    [[networkmanager.auto]] entries; `extra` is raw TOML (tables only) put before [links]."""
    lines = [
        f"state_dir = {toml_value(workdir / 'state')}",
        f"runtime_dir = {toml_value(runtime_dir or workdir / 'run')}",
    ]
    for header, values in (("[tproxy]", tproxy), ("[bypass]", bypass), ("[core]", core)):
        if values:
            lines += _table(header, values)
    if networkmanager or policies:
        lines += _table("[networkmanager]", networkmanager or {})
    for policy in policies:
        lines += _table("[[networkmanager.auto]]", policy)
    if extra:
        lines.append(extra)
    lines += _table("[links]", links or {})
    return "\n".join(lines) + "\n"


def write_config(path: Path, workdir: Path | None = None, **sections: Any) -> Path:
    """render_config into `path` (atomically: a running tproxyd may re-read it on SIGHUP)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_config(workdir or path.parent, **sections))
    tmp.replace(path)
    return path
