"""Parsed lists kept across restarts: a restart with an unchanged list skips only the parse; a
torn entry, a changed list or a lowered line limit is never served from the cache."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy_service import list_files
from tproxy_service.config import load_config
from tproxy_service.errors import ConfigError
from tproxy_service.list_cache import ListCache
from tproxy_service.model import AddressSet

LIST = "# list\n198.51.100.0/24\n203.0.113.7\n2001:db8::/32\n"


@pytest.fixture(autouse=True)
def new_process() -> Iterator[None]:
    """Each test starts as a freshly started tproxyd would: nothing parsed in memory."""
    list_files._loaded.clear()
    yield
    list_files._loaded.clear()


class CountingParser:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes, path: Path, max_lines: int, cancel: threading.Event | None = None) -> AddressSet:
        self.calls += 1
        return list_files.parse_list_bytes(data, path, max_lines, cancel)


def _load(path: Path, cache_dir: Path, parse: CountingParser, max_lines: int = 100) -> AddressSet:
    return list_files.load_cidr_file_cached(path, 1 << 20, max_lines, None, parse, ListCache(cache_dir))


def test_a_restart_with_an_unchanged_list_skips_the_parse(tmp_path: Path) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text(LIST)
    parse = CountingParser()
    first = _load(listed, tmp_path / "cache", parse)
    list_files._loaded.clear()  # a restart
    again = _load(listed, tmp_path / "cache", parse)
    assert parse.calls == 1 and again == first and len(first.v4) == 2 and len(first.v6) == 1
    listed.write_text(LIST + "192.0.2.0/24\n")  # changed: parsed, never served from the cache
    list_files._loaded.clear()
    changed = _load(listed, tmp_path / "cache", parse)
    assert parse.calls == 2 and len(changed.v4) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_entry_is_parsed_again_and_rewritten(tmp_path: Path, damage: str) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text(LIST)
    parse = CountingParser()
    first = _load(listed, tmp_path / "cache", parse)
    (entry,) = (tmp_path / "cache").iterdir()
    data = entry.read_bytes()
    entry.write_bytes(
        {"flip": data[:30] + bytes([data[30] ^ 1]) + data[31:], "truncate": data[:-5], "empty": b""}[damage]
    )
    list_files._loaded.clear()
    assert _load(listed, tmp_path / "cache", parse) == first and parse.calls == 2
    assert entry.read_bytes() == data  # rewritten intact
    list_files._loaded.clear()
    assert _load(listed, tmp_path / "cache", parse) == first and parse.calls == 2


def test_the_line_limit_holds_for_a_list_served_from_the_cache(tmp_path: Path) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text(LIST)
    parse = CountingParser()
    _load(listed, tmp_path / "cache", parse)
    list_files._loaded.clear()
    with pytest.raises(ConfigError, match=r"has more than 3 lines \(\[bypass\] max_file_lines\)"):
        _load(listed, tmp_path / "cache", parse, max_lines=3)


def test_entries_of_lists_no_longer_named_are_removed(tmp_path: Path) -> None:
    """Through the config: entries live under state_dir/lists, one per list named; a Reload
    served from memory keeps its entry."""
    lists = [tmp_path / "a.txt", tmp_path / "b.txt"]
    lists[0].write_text(LIST)
    lists[1].write_text("192.0.2.0/24\n")
    config = tmp_path / "tproxyd.toml"

    def names(*named: Path) -> set[str]:
        files = ", ".join(f'"{p}"' for p in named)
        config.write_text(f'state_dir = "{tmp_path / "state"}"\n[bypass]\nfiles = [{files}]\n')
        load_config(config, cache_lists=True)
        return {p.name for p in (tmp_path / "state" / "lists").iterdir()}

    both = names(*lists)
    assert len(both) == 2
    assert names(*lists) == both  # served from memory this time: kept all the same
    only_b = names(lists[1])
    assert len(only_b) == 1 and only_b < both
    load_config(config)  # without cache_lists (tproxyd --check): nothing written or removed
    assert {p.name for p in (tmp_path / "state" / "lists").iterdir()} == only_b
