"""CIDR parsing and interval arithmetic (fast enough for 100k-line lists), and the list files."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from pathlib import Path

from .bounded_read import read_lines
from .errors import ConfigError
from .model import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_FILE_LINES, AddressSet, Interval

BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def parse_cidr(text: str) -> tuple[int, Interval]:
    """'198.51.100.0/24', '2001:db8::/32' or a bare address -> (family, interval).

    Host bits after the prefix are ignored (198.51.100.7/24 means 198.51.100.0/24), as `nft` does.
    Raises ValueError with a short reason."""
    addr, slash, plen_text = text.strip().partition("/")
    family = 6 if ":" in addr else 4
    try:
        packed = socket.inet_pton(_AF[family], addr)
    except OSError:
        raise ValueError(f"{text.strip()!r} is not an IPv{family} address or CIDR") from None
    bits = BITS[family]
    if slash:
        if not plen_text.isdigit() or not 0 <= int(plen_text) <= bits:
            raise ValueError(f"{text.strip()!r} has an invalid prefix length (0-{bits})")
        plen = int(plen_text)
    else:
        plen = bits
    host_bits = bits - plen
    first = (int.from_bytes(packed, "big") >> host_bits) << host_bits
    return family, Interval(first, first + (1 << host_bits) - 1)


def merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sort and merge overlapping and adjacent intervals (nft rejects overlaps in one set)."""
    merged: list[Interval] = []
    for iv in sorted(intervals):
        if merged and iv.first <= merged[-1].last + 1:
            if iv.last > merged[-1].last:
                merged[-1] = Interval(merged[-1].first, iv.last)
        else:
            merged.append(iv)
    return tuple(merged)


def address_set(v4: Iterable[Interval] = (), v6: Iterable[Interval] = ()) -> AddressSet:
    return AddressSet(v4=merge(v4), v6=merge(v6))


def union(*sets: AddressSet) -> AddressSet:
    return address_set(
        [iv for s in sets for iv in s.v4],
        [iv for s in sets for iv in s.v6],
    )


def parse_cidrs(texts: Iterable[str], where: str) -> AddressSet:
    """Parse a list of CIDR strings; `where` names the source in errors (e.g. a config key)."""
    v4: list[Interval] = []
    v6: list[Interval] = []
    for i, text in enumerate(texts):
        try:
            family, iv = parse_cidr(text)
        except ValueError as e:
            raise ConfigError(f"{where}[{i}]: {e}") from None
        (v4 if family == 4 else v6).append(iv)
    return address_set(v4, v6)


def parse_cidr_lines(lines: Iterable[str], source: str) -> AddressSet:
    """One CIDR per line; '#' starts a comment; blank lines ignored. Errors name `source:line`."""
    v4: list[Interval] = []
    v6: list[Interval] = []
    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            family, iv = parse_cidr(text)
        except ValueError as e:
            raise ConfigError(f"{source}:{lineno}: {e}") from None
        (v4 if family == 4 else v6).append(iv)
    return address_set(v4, v6)


def load_cidr_file(
    path: Path,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_lines: int = DEFAULT_MAX_FILE_LINES,
    cancel: threading.Event | None = None,
) -> AddressSet:
    """A CIDR list file within the [bypass] limits; raises ConfigError, or Cancelled once
    `cancel` is set."""
    lines = read_lines(path, max_bytes, max_lines, "CIDR list file", "[bypass]", cancel)
    return parse_cidr_lines(lines, str(path))


def to_address(family: int, value: int) -> str:
    return socket.inet_ntop(_AF[family], value.to_bytes(BITS[family] // 8, "big"))


def prefix_len(family: int, iv: Interval) -> int | None:
    """The prefix length if the interval is exactly one CIDR block, else None."""
    size = iv.last - iv.first + 1
    if size & (size - 1) or iv.first % size:
        return None
    return BITS[family] - (size.bit_length() - 1)
