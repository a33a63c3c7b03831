from __future__ import annotations

import os
import random
import re
import threading
from pathlib import Path

import pytest

from tproxy_service import cidrs, list_files
from tproxy_service.bounded_read import Cancelled
from tproxy_service.cidrs import merge, parse_cidr, parse_cidr_lines
from tproxy_service.errors import ConfigError
from tproxy_service.list_files import load_cidr_file
from tproxy_service.model import DEFAULT_MAX_FILE_BYTES, AddressSet, Interval, PackedIntervals


def test_parse_cidr_normalizes_host_bits_and_bare_addresses() -> None:
    assert parse_cidr("198.51.100.7/24") == (4, Interval(0xC6336400, 0xC63364FF))
    assert parse_cidr("192.0.2.1") == (4, Interval(0xC0000201, 0xC0000201))
    family, iv = parse_cidr("2001:db8::/32")
    assert family == 6 and iv.last - iv.first == (1 << 96) - 1


@pytest.mark.parametrize("bad", ["1.2.3", "1.2.3.4/33", "1.2.3.4/", "::/129", "x", "1.2.3.4/-1", "1.2.3.4/ 8"])
def test_parse_cidr_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_cidr(bad)


def test_merge_overlapping_duplicate_and_adjacent() -> None:
    ivs = [
        Interval(10, 20),
        Interval(15, 30),
        Interval(10, 20),
        Interval(31, 40),
        Interval(50, 60),
        Interval(55, 56),
    ]
    assert merge(ivs) == (Interval(10, 40), Interval(50, 60))


def test_lines_with_comments_blanks_and_mixed_families() -> None:
    text = "# list\n\n198.51.100.0/24  # docs\n2001:db8::/32\n198.51.100.0/25\n   \n203.0.113.5\n"
    s = parse_cidr_lines(text.splitlines(), "list.txt")
    assert len(s.v4) == 2 and len(s.v6) == 1


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("198.51.100.0/24\n# fine\n203.0.113.0/33\n")
    with pytest.raises(ConfigError, match=r"list\.txt:3: '203\.0\.113\.0/33' has an invalid prefix length"):
        load_cidr_file(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read CIDR list file"):
        load_cidr_file(tmp_path / "nope.txt")


def test_100k_lines_load(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("".join(f"{a}.{b}.{c}.0/24\n" for a in (11, 12) for b in range(200) for c in range(250)))
    s = load_cidr_file(path)
    assert sum(iv.last - iv.first + 1 for iv in s.v4) == 100_000 * 256


# --- bounded reading: what a hostile or careless path may name -----------------------------------


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: a naive open() would wait forever
    for path, kind in ((Path("/dev/zero"), "a character device"), (fifo, "a FIFO"), (tmp_path, "a directory")):
        with pytest.raises(ConfigError, match=f"CIDR list file {re.escape(str(path))} is {kind}; only regular"):
            load_cidr_file(path)


def test_size_limit_is_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.truncate(200 << 20)  # sparse: 200 MB that cost no disk and would take seconds to parse
    expected = rf"{re.escape(str(path))} is larger than {DEFAULT_MAX_FILE_BYTES} bytes \(\[bypass\] max_file_bytes\)"
    with pytest.raises(ConfigError, match=expected):
        load_cidr_file(path)
    small = tmp_path / "small.txt"
    small.write_text("198.51.100.0/24\n")
    with pytest.raises(ConfigError, match=r"larger than 10 bytes"):
        load_cidr_file(small, max_bytes=10)
    assert load_cidr_file(small, max_bytes=16).v4


def test_line_limit(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("198.51.100.0/24\n# two\n203.0.113.0/24")  # the last line has no newline
    with pytest.raises(ConfigError, match=r"list\.txt has more than 2 lines \(\[bypass\] max_file_lines\)"):
        load_cidr_file(path, max_lines=2)
    assert len(load_cidr_file(path, max_lines=3).v4) == 2


def test_a_set_cancel_flag_abandons_the_parse(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("198.51.100.0/24\n" * 10_000)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        load_cidr_file(path, cancel=cancel)


def test_address_sets_keep_intervals_packed() -> None:
    s = cidrs.parse_cidrs(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"], "t")
    assert isinstance(s.v4, PackedIntervals) and isinstance(s.v6, PackedIntervals)
    assert len(s.v4.data) == 2 * 8 and len(s.v6.data) == 32  # (first, last) per interval, nothing else
    assert list(s.v4) == [Interval(0x0A000000, 0x0AFFFFFF), Interval(0xC0000207, 0xC0000207)]
    assert s.v4 == (Interval(0x0A000000, 0x0AFFFFFF), Interval(0xC0000207, 0xC0000207))  # compares as a sequence
    assert s.v4[-1] == Interval(0xC0000207, 0xC0000207) and s.v6[0].first == 0x20010DB8 << 96
    assert AddressSet(v4=(Interval(1, 2),)) == AddressSet(v4=PackedIntervals.pack(4, [Interval(1, 2)]))


def test_union_reuses_results_for_the_same_inputs() -> None:
    a = cidrs.parse_cidrs(["10.0.0.0/8"], "t")
    b = cidrs.parse_cidrs(["11.0.0.0/8"], "t")
    assert cidrs.union(a, AddressSet()) is a  # one non-empty input: nothing to merge
    first = cidrs.union(a, b)
    assert list(first.v4) == [Interval(0x0A000000, 0x0BFFFFFF)]
    assert cidrs.union(a, b) is first  # the adapter keeps encoded bytes for this very object


def test_an_unchanged_list_file_is_not_parsed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "list.txt"
    path.write_text("10.0.0.0/8\n")
    first = list_files.load_cidr_file_cached(path)
    parses: list[str] = []
    real = list_files.parse_cidr_lines
    monkeypatch.setattr(
        list_files, "parse_cidr_lines", lambda lines, source: parses.append(source) or real(lines, source)
    )
    assert list_files.load_cidr_file_cached(path) is first and parses == []  # same inode, size, times
    os.utime(path, ns=(1, 1))
    assert list_files.load_cidr_file_cached(path) is first and parses == []  # touched, same content
    path.write_text("11.0.0.0/8\n")
    changed = list_files.load_cidr_file_cached(path)
    assert parses == [str(path)] and list(changed.v4) == [Interval(0x0B000000, 0x0BFFFFFF)]
    with pytest.raises(ConfigError, match="larger than 4 bytes"):  # the cache never skips the limits
        list_files.load_cidr_file_cached(path, max_bytes=4)
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read CIDR list file"):
        list_files.load_cidr_file_cached(path)


@pytest.mark.parametrize("seed", range(30))
def test_packed_diff_is_the_set_difference_either_way(seed: int) -> None:
    """Against sets of intervals, for both families, sizes on both sides of the 64-record block
    the walk skips by, and changes anywhere (start, middle, end, all)."""
    rng = random.Random(seed)
    family = 4 if seed % 3 else 6
    width = 4 if family == 4 else 16
    pool = sorted({rng.getrandbits(8 * width - 8) << 8 for _ in range(rng.choice([0, 3, 64, 65, 300, 1000]))})
    old = [iv for iv in (Interval(p, p + 7) for p in pool) if rng.random() < 0.9]
    new = [iv for iv in (Interval(p, p + 7) for p in pool) if rng.random() < rng.choice([0.0, 0.5, 0.99, 1.0])]
    added, removed = cidrs.packed_diff(PackedIntervals.pack(width, old), PackedIntervals.pack(width, new), 10**6)
    assert added == tuple(sorted(set(new) - set(old)))
    assert removed == tuple(sorted(set(old) - set(new)))
    changed = len(added) + len(removed)
    if changed:
        limited = cidrs.packed_diff(PackedIntervals.pack(width, old), PackedIntervals.pack(width, new), changed - 1)
        assert limited is None
