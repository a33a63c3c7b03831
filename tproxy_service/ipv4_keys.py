"""IPv4 intervals in bulk, as 64-bit keys `first << 32 | last`, with every step over a whole list
done by C-level calls (map, array, sort) instead of a Python loop per line.

Parsing a 100k-line bypass list one line at a time takes ~0.2 s of pure Python; the same work
here is a few tens of ms, which is most of what start-up and a Reload of a changed list spend
outside the kernel. A key's 8 big-endian bytes are exactly a PackedIntervals pair for IPv4
(4-byte first, 4-byte last), so packing and unpacking are one array conversion each."""

from __future__ import annotations

import socket
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from functools import partial
from itertools import accumulate, compress, repeat
from operator import add, and_, gt, lshift, or_, rshift, sub

LOW = 0xFFFFFFFF
_NETMASK = [(LOW << (32 - n)) & LOW for n in range(33)]
_HOSTMASK = [LOW >> n for n in range(33)]
_pton4 = partial(socket.inet_pton, socket.AF_INET)
_SWAP = sys.byteorder == "little"
if array("I").itemsize != 4 or array("Q").itemsize != 8:  # true on every Linux target
    raise ImportError("array('I') must be 32 and array('Q') 64 bits wide")


def parse(tokens: Sequence[str]) -> list[int] | None:
    """The keys of `tokens`, each 'a.b.c.d/len' or a bare 'a.b.c.d' (host bits after the prefix
    cleared), unsorted; None when any token is not exactly that. The caller then parses line
    by line, which names the bad line."""
    if not tokens:
        return []
    addrs, lens = _split(tokens)
    digits = "".join(lens)
    if not all(lens) or not digits.isascii() or not digits.isdigit():
        return None
    plens = list(map(int, lens))
    if max(plens) > 32:
        return None
    try:
        words = array("I", b"".join(map(_pton4, addrs)))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    if _SWAP:
        words.byteswap()
    firsts = list(map(and_, words, map(_NETMASK.__getitem__, plens)))
    lasts = map(or_, firsts, map(_HOSTMASK.__getitem__, plens))
    return list(map(or_, map(lshift, firsts, repeat(32)), lasts))


def _split(tokens: Sequence[str]) -> tuple[Sequence[str], Sequence[str]]:
    """(addresses, prefix lengths); a bare address has length '32'."""
    slashes = list(map(str.count, tokens, repeat("/")))
    if min(slashes) == max(slashes) == 1:  # the common case, at the speed of one str.split
        fields = "\n".join(tokens).replace("/", "\n").split("\n")
        return fields[0::2], fields[1::2]
    addrs, seps, lens = zip(*map(str.partition, tokens, repeat("/")), strict=True)
    return addrs, [length if sep else "32" for sep, length in zip(seps, lens, strict=True)]


def merged(keys: list[int]) -> list[int]:
    """Sorted, with overlapping and adjacent intervals merged (sorts `keys` in place)."""
    keys.sort()
    if len(keys) < 2:
        return keys
    firsts = list(map(rshift, keys, repeat(32)))
    # The highest address reached so far: an interval starting beyond it + 1 starts a new run.
    reach = list(accumulate(map(and_, keys, repeat(LOW)), max))
    starts = [0, *compress(range(1, len(keys)), map(gt, firsts[1:], map(add, reach, repeat(1))))]
    if len(starts) == len(keys):  # nothing to merge (the common case)
        return keys
    ends = [*map(sub, starts[1:], repeat(1)), len(keys) - 1]
    return list(map(or_, map(lshift, map(firsts.__getitem__, starts), repeat(32)), map(reach.__getitem__, ends)))


def _words(data: bytes) -> array[int]:
    """Packed big-endian keys as native 64-bit words."""
    words = array("Q")
    words.frombytes(data)
    if _SWAP:
        words.byteswap()
    return words


def _packed(words: array[int]) -> bytes:
    if _SWAP:
        words.byteswap()
    return words.tobytes()


def pack(keys: list[int]) -> bytes:
    return _packed(array("Q", keys))


def unpack(data: bytes) -> list[int]:
    return _words(data).tolist()


def insert(packed: bytes, keys: Iterable[int]) -> bytes:
    """`packed` (sorted and merged, as pack() writes it) with `keys` merged in, each by one bisect
    and one splice: a few intervals (the reserved ranges) join a 100k list without the list ever
    existing as 100k objects."""
    words = _words(packed)
    for key in keys:
        first, last = key >> 32, key & LOW
        lo = bisect_left(words, first << 32)
        if lo and (words[lo - 1] & LOW) + 1 >= first:  # the one before reaches it (or touches it)
            lo -= 1
        hi = bisect_right(words, min(last + 1, LOW) << 32 | LOW)  # every one starting by last + 1
        if hi > lo:
            first, last = min(first, words[lo] >> 32), max(last, words[hi - 1] & LOW)
        words[lo:hi] = array("Q", (first << 32 | last,))
    return _packed(words)


def words(packed: bytes) -> Iterable[int]:
    """The keys of `packed`, iterable any number of times, with no int object per key until
    one is taken (an array, not a list)."""
    return _words(packed)
