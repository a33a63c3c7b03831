"""Validation of kernel interface names (shared by config, state and D-Bus)."""

from __future__ import annotations

from typing import Any

from .errors import InvalidArgument
from .model import LinkChoice

IFNAMSIZ = 16  # including the trailing NUL


def validate_ifname(name: str) -> str:
    """Return `name` if the kernel would accept it as an interface name, else raise InvalidArgument."""
    shown = repr(name if len(name) <= 40 else name[:40] + "...")
    encoded = name.encode("utf-8", "surrogatepass")
    if not 1 <= len(encoded) < IFNAMSIZ:
        raise InvalidArgument(f"interface name {shown} must be 1-{IFNAMSIZ - 1} bytes long")
    if name in (".", ".."):
        raise InvalidArgument(f"interface name {shown} is not allowed")
    for ch in name:
        if ch in "/:" or ch.isspace() or not ch.isprintable():
            raise InvalidArgument(f"interface name {shown} contains a character the kernel rejects ({ch!r})")
    return name


def parse_link(ifname: str, value: Any, allowed: tuple[LinkChoice, ...]) -> LinkChoice:
    """One link's entry of a config's [links] or of state.json; InvalidArgument says what is wrong."""
    validate_ifname(ifname)
    if not isinstance(value, str):
        raise InvalidArgument(f"mode must be a string, got {str(value)[:40]!r}")
    return LinkChoice.parse(value, allowed)
