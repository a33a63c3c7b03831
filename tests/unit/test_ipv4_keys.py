"""The bulk IPv4 path (ipv4_keys) against the line-by-line parse it replaces for speed: the same
sets for every list, the same error for every bad one."""

from __future__ import annotations

import random

import pytest

from tproxy_service import cidrs, ipv4_keys
from tproxy_service.errors import ConfigError


def _random_list(rng: random.Random, size: int) -> list[str]:
    """Overlaps, containment, duplicates, neighbours, host bits, bare addresses, both ends of the
    address space, comments, blanks, IPv6 and stray spaces: what real lists mix."""
    lines = []
    for _ in range(size):
        a = rng.choice([rng.getrandbits(32), rng.randrange(0x0A000000, 0x0A000400), 0, 0xFFFFFFFF])
        address = ".".join(str(a >> s & 255) for s in (24, 16, 8, 0))
        kind = rng.random()
        if kind < 0.1:
            lines.append(address)
        elif kind < 0.15:
            lines.append(f"2001:db8:{rng.getrandbits(16):x}::/{rng.randrange(16, 129)}")
        elif kind < 0.2:
            lines.append(rng.choice(["", "# comment", "   "]))
        else:
            line = f"{address}/{rng.randrange(0, 33)}"
            lines.append(rng.choice([line, f"  {line}\t", f"{line} # note"]))
    return lines


@pytest.mark.parametrize("seed", range(40))
def test_bulk_parse_equals_the_line_by_line_parse(seed: int) -> None:
    rng = random.Random(seed)
    lines = _random_list(rng, rng.choice([1, 5, 50, 2000]))
    if seed % 4 == 0:  # a list of CIDRs only takes the fastest split
        lines = [line for line in lines if "/" in line and "#" not in line]
    bulk = cidrs.parse_cidr_lines(lines, "list.txt")
    assert bulk == cidrs._parse_line_by_line(lines, "list.txt")
    assert bulk.v4 == cidrs.merge(iv for line in lines if (p := _parsed(line)) and p[0] == 4 for iv in [p[1]])


def _parsed(line: str) -> tuple[int, object] | None:
    text = line.partition("#")[0].strip()
    return cidrs.parse_cidr(text) if text else None


@pytest.mark.parametrize(
    "bad",
    [
        "198.51.100.0/33",
        "198.51.100.0/",
        "198.51.100.0/+8",
        "198.51.100.0/2 4",
        "198.51.100.0/24/8",
        "198.51.100/24",
        "1.2.3.4 5.6.7.8",
        "/24",
        "198.51.100.0/٢٤",
        "2001:db8::/129",
        "1.2.3.4/2:3",
        "1.2.3.4\x00/24",
        "2001:db8::\x00/32",
    ],
)
def test_a_bad_line_is_named_as_the_line_by_line_parse_names_it(bad: str) -> None:
    lines = ["198.51.100.0/24", "# ok", bad, "203.0.113.0/24"]
    with pytest.raises(ConfigError) as expected:
        cidrs._parse_line_by_line(lines, "list.txt")
    with pytest.raises(ConfigError) as got:
        cidrs.parse_cidr_lines(lines, "list.txt")
    assert str(got.value) == str(expected.value)
    assert str(got.value).startswith("list.txt:3: ")


@pytest.mark.parametrize("seed", range(20))
def test_merged_equals_the_pairwise_merge(seed: int) -> None:
    rng = random.Random(seed)
    pairs = []
    for _ in range(rng.choice([0, 1, 2, 10, 300])):
        first = rng.randrange(0, 1 << 12) if seed % 2 else rng.getrandbits(32)
        pairs.append((first, min(first + rng.choice([0, 1, 5, 300, 1 << 20]), ipv4_keys.LOW)))
    keys = [first << 32 | last for first, last in pairs]
    expected = [first << 32 | last for first, last in cidrs._merged(list(pairs))]
    assert ipv4_keys.merged(keys) == expected


def test_containment_across_a_gap_is_merged() -> None:
    """[0, 100] holds [10, 20] and [50, 60]: the second is inside the first even though it starts
    after the previous interval's end."""
    assert ipv4_keys.merged([0 << 32 | 100, 10 << 32 | 20, 50 << 32 | 60, 102 << 32 | 110]) == [
        0 << 32 | 100,
        102 << 32 | 110,
    ]


def test_keys_pack_as_packed_intervals() -> None:
    keys = [0xC6336400 << 32 | 0xC63364FF, 0xFFFFFF00 << 32 | 0xFFFFFFFF]
    data = ipv4_keys.pack(keys)
    assert data == bytes.fromhex("c6336400c63364ffffffff00ffffffff")
    assert ipv4_keys.unpack(data) == keys


@pytest.mark.parametrize("seed", range(30))
def test_insert_equals_merging_everything(seed: int) -> None:
    """A few intervals inserted into a big merged list give what merging all of them gives:
    joined neighbours on either side, swallowed stretches, both ends of the address space."""
    rng = random.Random(seed)
    big = []
    for _ in range(rng.choice([0, 1, 50, 500])):
        first = rng.randrange(0, 1 << 16) << 8 if seed % 2 else rng.getrandbits(32)
        big.append(first << 32 | min(first + rng.choice([0, 255, 4095]), ipv4_keys.LOW))
    few = []
    for _ in range(rng.choice([1, 3, 20])):
        first = rng.choice([0, ipv4_keys.LOW, rng.getrandbits(32), rng.randrange(0, 1 << 24)])
        few.append(first << 32 | min(first + rng.choice([0, 1, 300, 1 << 20]), ipv4_keys.LOW))
    packed = ipv4_keys.pack(ipv4_keys.merged(list(big)))
    assert ipv4_keys.unpack(ipv4_keys.insert(packed, few)) == ipv4_keys.merged(big + few)
