"""The container tiers' cache and mirror rules (tests/system/images.py): the mirror comes only
from the host's apt sources, and cache entries nobody used for a while are pruned."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.system import images

DEB822 = """\
Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://sources.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
"""


def apt_dir(tmp_path: Path, sources: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_mirror_from_deb822_sources_skips_pockets_and_source_packages(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert images.host_mirror(apt) == "http://mirror.example/debian"


def test_mirror_from_a_one_line_sources_list_with_options(tmp_path: Path) -> None:
    line = "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian trixie main\n"
    apt = apt_dir(tmp_path, {"sources.list": "# a comment\n" + line})
    assert images.host_mirror(apt) == "http://m.example/debian"


@pytest.mark.parametrize(
    "sources",
    [{}, {"sources.list": "# deb http://m.example/debian bookworm main\n"}, {"sources.list.d/x.sources": ""}],
)
def test_no_mirror_is_a_clear_error_not_a_guess(tmp_path: Path, sources: dict[str, str]) -> None:
    apt = apt_dir(tmp_path, sources)
    with pytest.raises(images.ImageError, match="no Debian mirror in the host's apt sources"):
        images.host_mirror(apt)


def test_prune_removes_entries_unused_for_too_long_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "CACHE_DIR", tmp_path)
    old, recent, other = tmp_path / "rootfs-bookworm-old", tmp_path / "rootfs-trixie-new", tmp_path / "wheels-x"
    for entry in (old, recent, other):
        (entry / "etc").mkdir(parents=True)
    month_ago = time.time() - 30 * 86400
    for entry in (old, other):
        os.utime(entry, (month_ago, month_ago))
    assert images.prune("rootfs", max_age_days=14) == [old]
    assert not old.exists() and recent.is_dir() and other.is_dir()  # other kinds are pruned by their own builds


def test_using_an_entry_keeps_it_from_pruning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "CACHE_DIR", tmp_path)
    entry = tmp_path / "rootfs-bookworm-used"
    entry.mkdir()
    month_ago = time.time() - 30 * 86400
    os.utime(entry, (month_ago, month_ago))
    assert images._use(entry)
    assert images.prune("rootfs", max_age_days=14) == []
    assert not images._use(tmp_path / "rootfs-bookworm-missing")
