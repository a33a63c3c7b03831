"""The saved D-Bus choices: atomic save, strict load, corrupt files moved aside, defaults merge."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tproxy_service.intent import Intent
from tproxy_service.model import Config, LinkChoice, LinkMode
from tproxy_service.state_store import Choices, StateStore


def test_missing_file_means_no_choices(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "nope").load() == Choices()


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    choices = Choices(False, {"wlan0": "host", "eth0": "disabled", "usb0": "auto"})
    store.save(choices)
    assert store.load() == choices
    data = json.loads(store.path.read_text())
    assert data == {"version": 1, "enabled": False, "links": {"eth0": "disabled", "usb0": "auto", "wlan0": "host"}}
    assert store.path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in store.path.parent.iterdir()] == ["state.json"]  # no temp file left


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    store.save(Choices(True, {"a": "lan"}))

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError):
        store.save(Choices(False, {}))
    monkeypatch.undo()
    assert store.load() == Choices(True, {"a": "lan"})
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b"\xff",
        b"[]",
        b'{"version": 1, "links": {"a b": "host"}}',
        b'{"version": 1, "links": {"a": 1}}',
        b"[" * 100_000 + b"]" * 100_000,  # json's parser recurses: RecursionError, not ValueError
        b'{"version": 1, "links": {}}' + b" " * (1 << 20),  # larger than any real state file
    ],
    ids=["truncated", "not-utf8", "not-an-object", "bad-name", "bad-choice", "deeply-nested", "huge"],
)
def test_corrupt_file_is_moved_aside_and_reported(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        assert store.load() == Choices()
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_bytes() == content
    assert "corrupt" in caplog.text and str(aside) in caplog.text


def test_stale_temp_files_are_removed_on_load(tmp_path: Path) -> None:
    (tmp_path / ".state.json.abc123").write_text("half")
    StateStore(tmp_path).load()
    assert list(tmp_path.iterdir()) == []


def test_choices_override_config_defaults() -> None:
    config = Config(link_defaults={"eth0": LinkMode.LAN, "wlan0": LinkMode.HOST})
    choices = Choices(None, {"eth0": LinkChoice.DISABLED, "wlan0": LinkChoice.BOTH, "usb0": LinkChoice.AUTO})
    assert Intent(config, choices).link_choices == {"usb0": "auto", "wlan0": "both"}
    assert Intent(config).link_choices == {"eth0": "lan", "wlan0": "host"}
    assert Intent(config, choices).manual_modes == {"usb0": None, "wlan0": LinkMode.BOTH}
