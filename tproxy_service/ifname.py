"""Validation of kernel interface names (shared by config, state and D-Bus)."""

from __future__ import annotations

from .errors import InvalidArgument

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
