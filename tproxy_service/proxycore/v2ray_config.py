"""PURE: the user's v2ray JSON + our settings -> the core config tproxyd runs.

tproxyd adds its two tproxy inbounds (127.0.0.1 and ::1 on [tproxy] port) and puts
`sockopt.mark = core_mark` on every outbound, keeping the user's other sockopt fields, so the
core's own connections are never diverted again, and the DNS route (dns_route.py). Conflicts
are refused, not papered over."""

from __future__ import annotations

import copy
import json
from typing import Any

from ..errors import ConfigError
from ..model import TproxySettings
from .dns_route import DNS_OUTBOUND_TAG, add_dns_route
from .v2ray_ports import port_ranges

INBOUND_TAGS = {4: "tproxyd-tproxy4", 6: "tproxyd-tproxy6"}
LISTEN = {4: "127.0.0.1", 6: "::1"}

DEFAULT_USER_CONFIG: dict[str, Any] = {
    "log": {"loglevel": "warning"},
    "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
}


def inbound_tags(settings: TproxySettings) -> list[str]:
    return [INBOUND_TAGS[f] for f in ((4, 6) if settings.ipv6 else (4,))]


def _tproxy_inbound(family: int, settings: TproxySettings, sniffing: bool) -> dict[str, Any]:
    inbound: dict[str, Any] = {
        "tag": INBOUND_TAGS[family],
        "listen": LISTEN[family],
        "port": settings.port,
        "protocol": "dokodemo-door",
        "settings": {"network": "tcp,udp" if settings.udp else "tcp", "followRedirect": True},
        "streamSettings": {"sockopt": {"tproxy": "tproxy"}},
    }
    if sniffing:
        inbound["sniffing"] = {"enabled": True, "destOverride": ["http", "tls"]}
    return inbound


def build_core_config(
    user: dict[str, Any] | None, settings: TproxySettings, source: str, sniffing: bool = True
) -> dict[str, Any]:
    """Merge; raises ConfigError naming `source` when the user's config conflicts with ours."""
    config = copy.deepcopy(user if user is not None else DEFAULT_USER_CONFIG)
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: the core config must be a JSON object")
    inbounds = config.get("inbounds", [])
    outbounds = config.get("outbounds", [])
    if not isinstance(inbounds, list) or not isinstance(outbounds, list):
        raise ConfigError(f"{source}: inbounds and outbounds must be JSON arrays")
    if not outbounds:
        raise ConfigError(f"{source}: the core config has no outbounds, so nothing could leave the core")
    for i, inbound in enumerate(inbounds):
        if not isinstance(inbound, dict):
            raise ConfigError(f"{source}: inbounds[{i}] must be a JSON object")
        if inbound.get("tag") in INBOUND_TAGS.values():
            raise ConfigError(f"{source}: inbounds[{i}] uses the tag {inbound['tag']!r}, which tproxyd reserves")
        if any(lo <= settings.port <= hi for lo, hi in port_ranges(inbound.get("port"))):
            raise ConfigError(
                f"{source}: inbounds[{i}] binds port {settings.port}, which is tproxyd's tproxy port ([tproxy] port)"
            )
    add_dns_route(config, settings, inbound_tags(settings), source)  # before the marks: its outbound gets one too
    for i, outbound in enumerate(outbounds):
        if not isinstance(outbound, dict):
            raise ConfigError(f"{source}: outbounds[{i}] must be a JSON object")
        stream = outbound.setdefault("streamSettings", {})
        sockopt = stream.setdefault("sockopt", {}) if isinstance(stream, dict) else None
        if not isinstance(sockopt, dict):
            raise ConfigError(f"{source}: outbounds[{i}].streamSettings.sockopt must be a JSON object")
        mark = sockopt.get("mark")
        if mark is not None and (not isinstance(mark, int) or isinstance(mark, bool)):
            raise ConfigError(
                f"{source}: outbounds[{i}] sets sockopt.mark to {json.dumps(mark)}, but the mark must be a "
                f"number: {settings.core_mark} ([tproxy] core_mark), or leave it out and tproxyd sets it"
            )
        if mark is not None and mark != settings.core_mark:
            raise ConfigError(
                f"{source}: outbounds[{i}] sets sockopt.mark {mark}, but tproxyd needs {settings.core_mark}"
                " ([tproxy] core_mark) on every outbound to avoid loops"
            )
        sockopt["mark"] = settings.core_mark
    families = (4, 6) if settings.ipv6 else (4,)
    config["inbounds"] = [_tproxy_inbound(f, settings, sniffing) for f in families] + inbounds
    return config


def parse_user_config(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the core config must be a JSON object")
    return data


def render(config: dict[str, Any]) -> str:
    """Stable text, so 'changed' means the content changed."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _line_paths(value: Any, path: str, out: list[str]) -> None:
    """The JSON path of every line `render` writes for `value` after its first (json.dumps with
    indent puts each key or item on a line of its own, and a container's closing bracket too)."""
    if isinstance(value, dict) and value:
        children: list[tuple[str, Any]] = [(f"{path}.{k}" if path else k, value[k]) for k in sorted(value)]
    elif isinstance(value, list) and value:
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return
    for child_path, child in children:
        out.append(child_path)
        _line_paths(child, child_path, out)
    out.append(path)


def _ours(item: Any) -> bool:
    """An inbound, routing rule or outbound tproxyd added to the user's config."""
    return isinstance(item, dict) and (
        item.get("tag") in (*INBOUND_TAGS.values(), DNS_OUTBOUND_TAG) or item.get("outboundTag") == DNS_OUTBOUND_TAG
    )


def _lists(config: dict[str, Any]) -> dict[str, list[Any]]:
    routing = config.get("routing")
    rules = routing.get("rules") if isinstance(routing, dict) else None
    found = {"inbounds": config.get("inbounds"), "outbounds": config.get("outbounds"), "routing.rules": rules}
    return {name: items for name, items in found.items() if isinstance(items, list)}


def locate(config: dict[str, Any], line: int, source: str) -> str:
    """Where line `line` (1-based) of `render(config)` came from, in the user's terms: the core
    cites lines of the merged file, which the user never sees. tproxyd's own entries (tproxy
    inbounds and the DNS rule in front, the DNS outbound at the end) shift the user's indexes."""
    paths = [""]
    _line_paths(config, "", paths)
    if not 1 <= line <= len(paths) or not paths[line - 1]:
        return f"line {line} of the merged core config"
    path = paths[line - 1]
    for name, items in _lists(config).items():
        if not path.startswith(f"{name}["):
            continue
        index_text, _, rest = path[len(name) + 1 :].partition("]")
        index = int(index_text)
        if _ours(items[index]):
            return f"{rest.lstrip('.') or 'itself'} of the {name} entry tproxyd adds (from [tproxy])"
        front = next((i for i, item in enumerate(items) if not _ours(item)), len(items))
        return f"{name}[{index - front}]{rest} in {source}"
    return f"{path} in {source}"
