"""The choices made over D-Bus (EnableLink, DisableLink, SetEnabled), persisted as JSON under
`state_dir` and restored at start.

`[links]` in the config are defaults; a persisted choice for a link overrides its default, and a
persisted "disabled" switches a config-default link off. Writes are atomic (temp file, fsync,
rename, fsync of the directory), so a crash leaves the old file or the new one, never half of
one. A file we cannot parse is moved aside (never silently dropped) and the defaults apply."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic_file import write_atomic
from .errors import InvalidArgument
from .ifname import parse_link
from .model import STATE_CHOICES, LinkChoice

log = logging.getLogger(__name__)

FILENAME = "state.json"
VERSION = 1
# Far above any real file (a few bytes per link); anything larger is not ours.
MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Choices:
    """`enabled` None means "never chosen" (on); `links` maps ifname -> the choice made for it
    (DISABLED switches a `[links]` default off)."""

    enabled: bool | None = None
    links: Mapping[str, LinkChoice] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "enabled": self.enabled, "links": dict(sorted(self.links.items()))}

    @staticmethod
    def from_json(data: Any) -> Choices:
        """Strict: anything unexpected raises ValueError (the file is then treated as corrupt)."""
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} tproxyd state object")
        unknown = set(data) - {"version", "enabled", "links"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        enabled = data.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise ValueError("'enabled' must be true, false or null")
        links = data.get("links", {})
        if not isinstance(links, dict):
            raise ValueError("'links' must be an object")
        parsed: dict[str, LinkChoice] = {}
        for name, value in links.items():
            try:
                parsed[name] = parse_link(name, value, STATE_CHOICES)
            except InvalidArgument as e:
                raise ValueError(str(e)) from None
        return Choices(enabled, parsed)


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.path = directory / FILENAME

    def load(self) -> Choices:
        """The persisted choices; none when the file is missing, unreadable or corrupt."""
        for stale in self.path.parent.glob(f".{self.path.name}.*"):  # temp files of a crashed save
            stale.unlink(missing_ok=True)
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return Choices()
        except OSError as e:
            log.error("cannot read the saved choices %s (%s); using the config's defaults", self.path, e)
            return Choices()
        if len(raw) > MAX_BYTES:
            return self._set_aside(f"it is larger than {MAX_BYTES} bytes")
        try:
            return Choices.from_json(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError:
            return self._set_aside("it is not UTF-8 text")
        except RecursionError:  # deeply nested JSON: json's parser recurses once per level
            return self._set_aside("it is nested too deeply")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            return self._set_aside(str(e))

    def _set_aside(self, problem: str) -> Choices:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
        except OSError as e:
            log.error("saved choices %s are corrupt (%s) and could not be moved aside: %s", self.path, problem, e)
        else:
            log.error(
                "saved choices %s are corrupt (%s); moved to %s, using the config's defaults",
                self.path,
                problem,
                aside,
            )
        return Choices()

    def save(self, choices: Choices) -> None:
        """Atomically replace the file; raises OSError (the old file is then intact)."""
        write_atomic(self.path, (json.dumps(choices.to_json(), indent=2) + "\n").encode())
