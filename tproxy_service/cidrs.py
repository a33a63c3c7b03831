"""CIDR parsing and interval arithmetic (fast enough for 100k-line lists); pure (list files: list_files.py)."""

from __future__ import annotations

import operator
import socket
from collections.abc import Iterable
from itertools import repeat
from operator import itemgetter

from . import ipv4_keys
from .errors import ConfigError
from .model import AddressSet, Interval, PackedIntervals

BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _bounds(text: str) -> tuple[int, int, int]:
    """(family, first, last) of a CIDR or bare address; raises ValueError with a short reason."""
    addr, slash, plen_text = text.strip().partition("/")
    family = 6 if ":" in addr else 4
    try:
        packed = socket.inet_pton(_AF[family], addr)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        raise ValueError(f"{text.strip()!r} is not an IPv{family} address or CIDR") from None
    bits = BITS[family]
    if slash:
        if not (plen_text.isascii() and plen_text.isdigit()) or not 0 <= int(plen_text) <= bits:
            raise ValueError(f"{text.strip()!r} has an invalid prefix length (0-{bits})")
        plen = int(plen_text)
    else:
        plen = bits
    host_bits = bits - plen
    first = (int.from_bytes(packed, "big") >> host_bits) << host_bits
    return family, first, first + (1 << host_bits) - 1


def parse_cidr(text: str) -> tuple[int, Interval]:
    """'198.51.100.0/24', '2001:db8::/32' or a bare address -> (family, interval).

    Host bits after the prefix are ignored (198.51.100.7/24 means 198.51.100.0/24), as `nft` does.
    Raises ValueError with a short reason."""
    family, first, last = _bounds(text)
    return family, Interval(first, last)


def _merged(bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping and adjacent (first, last) pairs, in place of objects."""
    bounds.sort()
    merged: list[tuple[int, int]] = []
    for first, last in bounds:
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def _packed(family: int, bounds: list[tuple[int, int]]) -> PackedIntervals:
    if family == 4:
        return _packed4([first << 32 | last for first, last in bounds])
    width = BITS[family] // 8
    return PackedIntervals(width, b"".join(f.to_bytes(width) + last.to_bytes(width) for f, last in _merged(bounds)))


def _packed4(keys: list[int]) -> PackedIntervals:
    return PackedIntervals(4, ipv4_keys.pack(ipv4_keys.merged(keys)))


def merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sort and merge overlapping and adjacent intervals (nft rejects overlaps in one set)."""
    return tuple(Interval(f, last) for f, last in _merged([(iv.first, iv.last) for iv in intervals]))


def _pairs(intervals: Iterable[Interval]) -> list[tuple[int, int]]:
    if isinstance(intervals, PackedIntervals):
        return list(intervals.bounds())
    return [(iv.first, iv.last) for iv in intervals]


def address_set(v4: Iterable[Interval] = (), v6: Iterable[Interval] = ()) -> AddressSet:
    return AddressSet(v4=_packed(4, _pairs(v4)), v6=_packed(6, _pairs(v6)))


_last_union: tuple[tuple[AddressSet, ...], AddressSet] | None = None


def union(*sets: AddressSet) -> AddressSet:
    """The merged union. The same input objects give the same result object (the adapter keeps
    the encoded bypass set for one object), and a single non-empty input is returned as is."""
    global _last_union
    nonempty = tuple(s for s in sets if s.v4 or s.v6)
    if len(nonempty) == 1:
        return nonempty[0]
    last = _last_union
    if last is not None and len(last[0]) == len(nonempty) and all(map(operator.is_, last[0], nonempty)):
        return last[1]
    result = AddressSet(
        _union4([PackedIntervals.pack(4, s.v4) for s in nonempty]),
        _packed(6, [b for s in nonempty for b in _pairs(s.v6)]),
    )
    _last_union = (nonempty, result)
    return result


_FEW = 4096  # intervals merged into a larger list one by one (ipv4_keys.insert)


def _union4(parts: list[PackedIntervals]) -> PackedIntervals:
    """A big list and a few more (the reserved ranges, [bypass] cidrs) are merged by insertion;
    anything else in bulk."""
    parts = sorted(parts, key=len)
    if parts and sum(map(len, parts[:-1])) <= _FEW:
        few = [key for part in parts[:-1] for key in ipv4_keys.words(part.data)]
        return PackedIntervals(4, ipv4_keys.insert(parts[-1].data, few))
    return _packed4([key for part in parts for key in ipv4_keys.unpack(part.data)])


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
    """One CIDR per line; '#' starts a comment; blank lines ignored. Errors name `source:line`.

    IPv4 entries are parsed in bulk (ipv4_keys); a list with anything the bulk parse does not
    take is parsed again line by line, which raises the error that names the line."""
    lines = lines if isinstance(lines, list) else list(lines)
    tokens = list(filter(None, map(str.strip, map(itemgetter(0), map(str.partition, lines, repeat("#"))))))
    v6 = [t for t in tokens if ":" in t]
    keys = ipv4_keys.parse([t for t in tokens if ":" not in t] if v6 else tokens)
    v6_bounds = _ipv6_bounds(v6) if keys is not None else None
    if keys is None or v6_bounds is None:
        return _parse_line_by_line(lines, source)
    return AddressSet(_packed4(keys), _packed(6, v6_bounds))


def _ipv6_bounds(tokens: list[str]) -> list[tuple[int, int]] | None:
    """(first, last) of IPv6 CIDR tokens, or None when one is not that."""
    out = []
    for token in tokens:
        try:
            family, first, last = _bounds(token)
        except ValueError:
            return None
        if family != 6:
            return None
        out.append((first, last))
    return out


def _parse_line_by_line(lines: list[str], source: str) -> AddressSet:
    found: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip() if "#" in raw else raw.strip()
        if not text:
            continue
        try:
            family, first, last = _bounds(text)
        except ValueError as e:
            raise ConfigError(f"{source}:{lineno}: {e}") from None
        found[family].append((first, last))
    return AddressSet(_packed(4, found[4]), _packed(6, found[6]))


_BLOCK = 64  # records compared at once while the two lists agree


def packed_diff(
    old: PackedIntervals, new: PackedIntervals, limit: int
) -> tuple[tuple[Interval, ...], tuple[Interval, ...]] | None:
    """(intervals only in `new`, intervals only in `old`), or None once more than `limit` differ.

    A merge walk over the sorted packed records (big-endian, so bytes order is address order)
    that skips agreeing stretches a block at a time: a 1% change of a 100k list costs a few ms,
    and only the differences ever exist as objects (a set of 100k records would leave the
    allocator's arenas fragmented, measured as MBs of RSS kept after each Reload)."""
    step, a, b = 2 * old.width, old.data, new.data
    block = step * _BLOCK
    added: list[bytes] = []
    removed: list[bytes] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i : i + block] == b[j : j + block]:
            i, j = i + block, j + block
            continue
        x, y = a[i : i + step], b[j : j + step]
        if x == y:
            i, j = i + step, j + step
        elif x < y:
            removed.append(x)
            i += step
        else:
            added.append(y)
            j += step
        if len(added) + len(removed) > limit:
            return None
    removed += (a[k : k + step] for k in range(i, len(a), step))
    added += (b[k : k + step] for k in range(j, len(b), step))
    if len(added) + len(removed) > limit:
        return None
    return tuple(PackedIntervals(old.width, b"".join(added))), tuple(PackedIntervals(old.width, b"".join(removed)))


def to_address(family: int, value: int) -> str:
    return socket.inet_ntop(_AF[family], value.to_bytes(BITS[family] // 8, "big"))


def prefix_len(family: int, iv: Interval) -> int | None:
    """The prefix length if the interval is exactly one CIDR block, else None."""
    size = iv.last - iv.first + 1
    if size & (size - 1) or iv.first % size:
        return None
    return BITS[family] - (size.bit_length() - 1)
