"""PURE: v2ray's port specifications (inbound `port`, routing rule `port`)."""

from __future__ import annotations

from typing import Any


def port_ranges(spec: Any) -> list[tuple[int, int]]:
    """An int, "1234", "1000-2000" or "1,3,5-9" -> inclusive ranges; anything else -> none."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [(spec, spec)]
    if not isinstance(spec, str):
        return []
    ranges = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            ranges.append((int(lo), int(hi or lo)))
    return ranges
