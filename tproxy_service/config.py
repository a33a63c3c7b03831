"""TOML config -> frozen dataclasses. Every error names the key and its line."""

from __future__ import annotations

import dataclasses
import re
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bounded_read import read_text
from .cidrs import parse_cidrs, union
from .errors import ConfigError, InvalidArgument
from .ifname import parse_link
from .list_cache import ListCache
from .list_files import ListParser, load_cidr_file_cached
from .model import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_FILE_LINES,
    DEFAULT_TPROXY_PORT,
    FIXED_MODES,
    PRIVILEGED_PORTS_END,
    WITH_AUTO,
    AddressSet,
    AutoPolicy,
    BypassSettings,
    Config,
    CoreSettings,
    DnsHijack,
    FailurePolicy,
    LinkChoice,
    LinkMode,
    NetworkManagerSettings,
    TproxySettings,
)
from .nm_policy import POLICY_TYPES

DEFAULT_PATH = Path("/etc/tproxyd/config.toml")
MAX_CONFIG_BYTES = 1 << 20
_RESERVED_ROUTE_TABLES = (0, 253, 254, 255)  # unspec, default, main, local


class _Source:
    """Finds the line a key is on, for error messages (tomllib reports no positions)."""

    _header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
    _array_header = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]")
    _key = re.compile(r"""^\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*=""")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.lines = text.splitlines()

    def line_of(self, section: str, key: str | None = None) -> int | None:
        """`section` may name an array-of-tables entry, e.g. "networkmanager.auto[1]" (0-based)."""
        current = ""
        entries: dict[str, int] = {}  # [[name]] headers seen so far
        for lineno, line in enumerate(self.lines, 1):
            header = self._array_header.match(line) or self._header.match(line)
            if header:
                current = header.group(1).strip().strip("\"'")
                if header.re is self._array_header:
                    entries[current] = entries.get(current, -1) + 1
                    current = f"{current}[{entries[current]}]"
                if key is None and current == section:
                    return lineno
                continue
            m = self._key.match(line)
            if m and current == section and key is not None:
                found = next(g for g in m.groups() if g is not None)
                if found == key:
                    return lineno
        return None

    def error(self, section: str, key: str | None, message: str) -> ConfigError:
        line = self.line_of(section, key)
        if line is None and key:  # a sub-table written as a header: [section.key]
            line = self.line_of(f"{section}.{key}" if section else key)
        where = f"{self.name}:{line}" if line else self.name
        name = ".".join(p for p in (section, key) if p)
        return ConfigError(f"{where}: {name}: {message}")


def _int_in(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {_show(v)}"
        if not lo <= v <= hi:
            return f"must be between {lo} and {hi}, got {v}"
        return None

    return check


def _is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {_show(v)}"


# The old boolean spellings keep their old meaning: true was "DNS to connected subnets".
_DNS_HIJACK: dict[Any, DnsHijack] = {True: DnsHijack.LAN, False: DnsHijack.OFF} | {m.value: m for m in DnsHijack}


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_TPROXY_KEYS: dict[str, Callable[[Any], str | None]] = {
    "port": _int_in(1, 65535),
    "mark": _int_in(1, 0xFFFFFFFF),
    "core_mark": _int_in(1, 0xFFFFFFFF),
    "route_table": _int_in(1, 0xFFFFFFFF),
    "rule_priority": _int_in(1, 32765),
    "ipv6": _is_bool,
    "udp": _is_bool,
    "dns_hijack": lambda v: (
        None
        if isinstance(v, bool) or (isinstance(v, str) and v in _DNS_HIJACK)
        else f'must be "off", "lan" or "all" (true and false are the old spellings of "lan" and "off"), got {_show(v)}'
    ),
    "failure_policy": lambda v: None if v in ("open", "closed") else f'must be "open" or "closed", got {_show(v)}',
    "allow_unprivileged_port": _is_bool,
    "bypass_ct_bit": _int_in(0, 31),
}
_BYPASS_KEYS: dict[str, Callable[[Any], str | None]] = {
    "reserved": _is_bool,
    "local_subnets": _is_bool,
    "local_min_prefix4": _int_in(0, 32),
    "local_min_prefix6": _int_in(0, 128),
    "cidrs": lambda v: (
        None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "must be a list of CIDR strings"
    ),
    "files": lambda v: (
        None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "must be a list of file paths"
    ),
    "max_file_bytes": _int_in(1, 1 << 40),
    "max_file_lines": _int_in(1, 1 << 40),
}
_CORE_KEYS: dict[str, Callable[[Any], str | None]] = {
    "supervise": _is_bool,
    "config": lambda v: None if isinstance(v, str) and v else "must be a path to the core's JSON config",
    "binary": lambda v: None if isinstance(v, str) and v.startswith("/") else "must be an absolute path",
    "unit": lambda v: (
        None
        if isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9:_.\\@-]+\.service", v)
        else "must be a systemd service unit name (NAME.service)"
    ),
    "systemd_bus": lambda v: (
        None
        if isinstance(v, str) and (v in ("system", "user") or "=" in v)
        else 'must be "system", "user" or a D-Bus address (unix:path=...)'
    ),
    "sniffing": _is_bool,
}
_NM_KEYS: dict[str, Callable[[Any], str | None]] = {
    "enabled": _is_bool,
    "auto": lambda v: (
        None
        if isinstance(v, list) and all(isinstance(x, dict) for x in v)
        else "must be an array of tables ([[networkmanager.auto]] entries)"
    ),
}
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_AUTO_KEYS: dict[str, Callable[[Any], str | None]] = {
    "id": lambda v: None if isinstance(v, str) and v else "must be a connection name (a non-empty string)",
    "uuid": lambda v: (
        None if isinstance(v, str) and _UUID.fullmatch(v) else f"must be a connection UUID, got {_show(v)}"
    ),
    "type": lambda v: (
        None if v in POLICY_TYPES else f"unknown device type {_show(v)} (known: {', '.join(sorted(POLICY_TYPES))})"
    ),
    "shared": _is_bool,
    "mode": lambda v: _choice_problem(v, WITH_AUTO),
}
_MATCH_KEYS = ("id", "uuid", "type", "shared")
_TOP_KEYS = {"state_dir", "runtime_dir", "tproxy", "bypass", "links", "core", "networkmanager"}


def _choice_problem(value: Any, allowed: tuple[LinkChoice, ...]) -> str | None:
    try:
        LinkChoice.parse(value if isinstance(value, str) else str(value), allowed)
    except InvalidArgument as e:
        return str(e)
    return None


def _table(src: _Source, data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise src.error("", name, "must be a table ([" + name + "])")
    return value


def _check_keys(
    src: _Source,
    section: str,
    table: dict[str, Any],
    checks: dict[str, Any],
    fail: Callable[[str, str], ConfigError] | None = None,
) -> None:
    """Every key known and valid; `fail(key, message)` builds the error (default: src.error)."""
    fail = fail or (lambda key, message: src.error(section, key, message))
    for key, value in table.items():
        if key not in checks:
            raise fail(key, f"unknown key (known: {', '.join(sorted(checks))})")
        problem = checks[key](value)
        if problem:
            raise fail(key, problem)


def _path(base: Path, value: Any, src: _Source, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise src.error("", key, f"must be a non-empty path string, got {_show(value)}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _networkmanager(src: _Source, table: dict[str, Any]) -> NetworkManagerSettings:
    _check_keys(src, "networkmanager", table, _NM_KEYS)
    policies = []
    for index, entry in enumerate(table.get("auto", [])):
        section = f"networkmanager.auto[{index}]"

        def fail(key: str | None, message: str, section: str = section) -> ConfigError:
            # An entry written inline (auto = [{...}]) has no header: point at the `auto` line.
            line = src.line_of(section, key) or src.line_of(section) or src.line_of("networkmanager", "auto")
            name = f"{section}.{key}" if key else section
            return ConfigError(f"{src.name}:{line}: {name}: {message}" if line else f"{src.name}: {name}: {message}")

        _check_keys(src, section, entry, _AUTO_KEYS, fail)
        if "mode" not in entry:
            raise fail(None, 'needs a mode ("host", "lan", "both" or "auto")')
        if not any(key in entry for key in _MATCH_KEYS):
            raise fail(None, f"needs at least one of {', '.join(_MATCH_KEYS)} to match connections")
        policies.append(
            AutoPolicy(
                mode=LinkChoice(entry["mode"]).mode,
                id=entry.get("id"),
                uuid=entry["uuid"].lower() if "uuid" in entry else None,
                type=entry.get("type"),
                shared=entry.get("shared"),
            )
        )
    return NetworkManagerSettings(**_given(table, "enabled"), auto=tuple(policies))


def parse_config(
    text: str,
    name: str = "<config>",
    base: Path | None = None,
    cancel: threading.Event | None = None,
    parse_list: ListParser | None = None,
    cache_lists: bool = False,
) -> Config:
    """Parse and validate config text. CIDR list files named in it are read too, within the
    [bypass] limits; setting `cancel` abandons that (Cancelled). `parse_list` parses a changed
    list file; with `cache_lists`, parsed lists are kept under `state_dir` across restarts."""
    src = _Source(name, text)
    base = base or Path.cwd()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name}: invalid TOML: {e}") from None

    for key in data:
        if key not in _TOP_KEYS:
            raise src.error("", key, f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    tproxy_t = _table(src, data, "tproxy")
    bypass_t = _table(src, data, "bypass")
    links_t = _table(src, data, "links")
    core_t = _table(src, data, "core")
    nm_t = _table(src, data, "networkmanager")
    _check_keys(src, "tproxy", tproxy_t, _TPROXY_KEYS)
    _check_keys(src, "bypass", bypass_t, _BYPASS_KEYS)
    _check_keys(src, "core", core_t, _CORE_KEYS)
    networkmanager = _networkmanager(src, nm_t)

    tproxy_given: dict[str, Any] = dict(tproxy_t)  # checked; two keys need converting
    if "failure_policy" in tproxy_t:
        tproxy_given["failure_policy"] = FailurePolicy(tproxy_t["failure_policy"])
    if "dns_hijack" in tproxy_t:
        tproxy_given["dns_hijack"] = _DNS_HIJACK[tproxy_t["dns_hijack"]]
    tproxy = TproxySettings(**tproxy_given)
    if tproxy.mark == tproxy.core_mark:
        raise src.error("tproxy", "core_mark", "must differ from tproxy.mark, or the core's traffic loops")
    if tproxy.port >= PRIVILEGED_PORTS_END and not tproxy.allow_unprivileged_port:
        raise src.error(
            "tproxy",
            "port",
            f"{tproxy.port} is not a privileged port: while the core is down any local user could bind it "
            f"and keep the core from listening; use a port below {PRIVILEGED_PORTS_END} "
            f"(default {DEFAULT_TPROXY_PORT}) or set allow_unprivileged_port = true",
        )
    if tproxy.route_table in _RESERVED_ROUTE_TABLES:
        raise src.error("tproxy", "route_table", f"{tproxy.route_table} is a kernel-reserved routing table")

    link_defaults: dict[str, LinkMode] = {}
    for ifname, mode in links_t.items():
        try:
            link_defaults[ifname] = LinkMode(parse_link(ifname, mode, FIXED_MODES).value)
        except InvalidArgument as e:
            raise src.error("links", ifname, str(e)) from None

    files = tuple(_path(base, f, src, "bypass.files") for f in bypass_t.get("files", []))
    cidrs = tuple(bypass_t.get("cidrs", []))
    try:
        user_cidrs = parse_cidrs(cidrs, "bypass.cidrs")
    except ConfigError as e:
        line = src.line_of("bypass", "cidrs")
        raise ConfigError(f"{name}:{line}: {e}" if line else f"{name}: {e}") from None
    max_bytes = bypass_t.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES)
    max_lines = bypass_t.get("max_file_lines", DEFAULT_MAX_FILE_LINES)
    given: dict[str, Any] = {
        key: _path(base, data[key], src, key) for key in ("state_dir", "runtime_dir") if key in data
    }
    cache = ListCache(given.get("state_dir", Config.state_dir) / "lists") if cache_lists else None
    try:
        lists = [load_cidr_file_cached(f, max_bytes, max_lines, cancel, parse_list, cache) for f in files]
    except ConfigError as e:  # a missing, bad or oversized list: which key of which config brought it in
        raise src.error("bypass", "files", str(e)) from None
    user_bypass: AddressSet = union(user_cidrs, *lists)
    core_given = _given(core_t, "supervise", "unit", "systemd_bus", "sniffing")
    if "config" in core_t:
        core_given["config"] = _path(base, core_t["config"], src, "core.config")
    if "binary" in core_t:
        core_given["binary"] = Path(core_t["binary"])
    config = Config(
        **given,
        tproxy=tproxy,
        bypass=BypassSettings(
            **_given(bypass_t, "reserved", "local_subnets", "local_min_prefix4", "local_min_prefix6"),
            cidrs=cidrs,
            files=files,
            max_file_bytes=max_bytes,
            max_file_lines=max_lines,
        ),
        link_defaults=link_defaults,
        core=CoreSettings(**core_given),
        networkmanager=networkmanager,
        user_bypass=user_bypass,
    )
    if cache is not None:  # the config is whole: entries of lists it no longer names can go
        cache.prune()
    return config


def _given(table: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The keys the file sets, as they are (checked already); the rest keep model.py's defaults."""
    return {key: table[key] for key in keys if key in table}


def load_config(
    path: Path,
    cancel: threading.Event | None = None,
    parse_list: ListParser | None = None,
    cache_lists: bool = False,
) -> Config:
    """The config file and the list files it names (see parse_config); raises ConfigError, or
    Cancelled once `cancel` is set (blocking: the daemon calls it in a thread)."""
    text = read_text(path, MAX_CONFIG_BYTES, "config file", "a config is at most 1 MiB")
    config = parse_config(text, str(path), path.parent, cancel, parse_list, cache_lists)
    return dataclasses.replace(config, path=path)
