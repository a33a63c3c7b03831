"""PURE: inbounds of the user's core config that are open proxies on every link.

An inbound that listens on a non-loopback address (v2ray's default `listen` is every address)
and asks nobody for credentials lets anyone who reaches this machine, on any link, use the core
as a proxy. tproxyd runs such a config anyway (it may be meant for a trusted LAN) but says so."""

from __future__ import annotations

import ipaddress
from typing import Any

# Protocols that serve anyone unless accounts are configured; the others (vmess, vless, trojan,
# shadowsocks, ...) cannot be used without their id or key.
_OPEN_UNLESS_ACCOUNTS = {"socks", "http", "mixed"}
_ALWAYS_OPEN = {"dokodemo-door"}  # forwards whatever reaches it: an open relay


def _loopback(listen: Any) -> bool:
    if not isinstance(listen, str):
        return False  # missing: v2ray listens on every address
    if listen.startswith(("/", "@")):
        return True  # a unix socket: not reachable over the network
    if listen == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen).is_loopback
    except ValueError:
        return False


def _authenticated(protocol: str, settings: Any) -> bool:
    if protocol in _ALWAYS_OPEN:
        return False
    if protocol not in _OPEN_UNLESS_ACCOUNTS:
        return True
    if not isinstance(settings, dict):
        return False
    if protocol in ("socks", "mixed") and settings.get("auth", "noauth") != "password":
        return False
    accounts = settings.get("accounts")
    return isinstance(accounts, list) and len(accounts) > 0


def open_proxy_warnings(user: dict[str, Any] | None) -> tuple[str, ...]:
    """One sentence per open inbound of the user's config."""
    warnings = []
    inbounds = user.get("inbounds", []) if isinstance(user, dict) else []
    for index, inbound in enumerate(inbounds if isinstance(inbounds, list) else []):
        if not isinstance(inbound, dict):
            continue
        protocol = str(inbound.get("protocol", ""))
        listen = inbound.get("listen")
        if _loopback(listen) or _authenticated(protocol, inbound.get("settings")):
            continue
        tag = f" (tag {inbound['tag']!r})" if isinstance(inbound.get("tag"), str) else ""
        where = f"{listen if isinstance(listen, str) else 'every address'} port {inbound.get('port')}"
        warnings.append(
            f"the core config's inbounds[{index}]{tag} is an open proxy on every link: {protocol or 'an inbound'} "
            f"on {where} without authentication"
        )
    return tuple(warnings)
