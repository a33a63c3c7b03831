"""The [bypass] list files: read within their limits, parsed (in this process, or by a given
ListParser such as list_child.parse_in_child), and not parsed again while unchanged: between
Reloads by inode, size and times (else content hash), across restarts through a ListCache."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .bounded_read import check_line_count, decode, lines_within, read_bytes
from .cidrs import parse_cidr_lines
from .list_cache import ListCache
from .model import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_FILE_LINES, AddressSet

_BYTES_LIMIT = "[bypass] max_file_bytes"


def load_cidr_file(
    path: Path,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_lines: int = DEFAULT_MAX_FILE_LINES,
    cancel: threading.Event | None = None,
) -> AddressSet:
    """A CIDR list file within the [bypass] limits; raises ConfigError, or Cancelled once
    `cancel` is set."""
    return parse_list_bytes(read_bytes(path, max_bytes, "CIDR list file", _BYTES_LIMIT), path, max_lines, cancel)


def parse_list_bytes(data: bytes, path: Path, max_lines: int, cancel: threading.Event | None = None) -> AddressSet:
    """A CIDR list file's content (read within its byte limit), within `max_lines`."""
    text = decode(data, path, "CIDR list file")
    return parse_cidr_lines(lines_within(text, path, max_lines, "CIDR list file", "[bypass]", cancel), str(path))


class ListParser(Protocol):
    def __call__(
        self, data: bytes, path: Path, max_lines: int, cancel: threading.Event | None = None
    ) -> AddressSet: ...


@dataclass(frozen=True)
class _Loaded:
    stat: tuple[int, ...]
    digest: bytes
    addresses: AddressSet


_loaded: dict[Path, _Loaded] = {}
_LOADED_MAX = 16


def _stat_key(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load_cidr_file_cached(
    path: Path,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_lines: int = DEFAULT_MAX_FILE_LINES,
    cancel: threading.Event | None = None,
    parse: ListParser | None = None,
    cache: ListCache | None = None,
) -> AddressSet:
    """`load_cidr_file`, skipped when the file did not change since the last load under the same
    limits: the same inode, size and times, or else the same content hash (read within the same
    bounds). Returns the same AddressSet object then, so nothing downstream is rebuilt either.
    `parse` parses a changed file's bytes (default: parse_list_bytes, in this process); `cache`
    keeps what it parsed across restarts (list_cache.py)."""
    parse = parse or parse_list_bytes
    try:
        stat = (*_stat_key(path), max_bytes, max_lines)
    except OSError:
        return load_cidr_file(path, max_bytes, max_lines, cancel)  # says why, as an uncached load would
    known = _loaded.get(path)
    if known is not None and known.stat == stat:
        if cache is not None:
            cache.keep(known.digest)
        return known.addresses
    data = read_bytes(path, max_bytes, "CIDR list file", _BYTES_LIMIT)
    digest = hashlib.sha256(data).digest()
    if cache is not None:
        cache.keep(digest)
    if known is not None and known.digest == digest and known.stat[-2:] == stat[-2:]:
        addresses = known.addresses
    else:  # parse the bytes just hashed (the file is read once), unless parsed before a restart
        kept = cache.get(digest) if cache is not None else None
        if kept is not None:
            check_line_count(data, path, max_lines, "CIDR list file", "[bypass]")
            addresses = kept
        else:
            addresses = parse(data, path, max_lines, cancel)
            if cache is not None:
                cache.put(digest, addresses)
    _loaded.pop(path, None)
    while len(_loaded) >= _LOADED_MAX:
        _loaded.pop(next(iter(_loaded)))
    _loaded[path] = _Loaded(stat, digest, addresses)
    return addresses
