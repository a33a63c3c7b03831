"""bus/connection.py without a bus: a dbus-fast without the private writer it patches is an error
in the log, never a silent skip (the working patch is tested in tests/integration)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tproxy_service.bus.connection import patch_full_buffer


class _BusWithoutWriter:
    """What a dbus-fast that renamed MessageBus._writer looks like to the patch."""


def test_changed_dbus_fast_internals_are_an_error(caplog: pytest.LogCaptureFixture) -> None:
    bus: Any = _BusWithoutWriter()
    with caplog.at_level(logging.DEBUG, logger="tproxy_service.bus.connection"):
        assert patch_full_buffer(bus) is False
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert "_writer.sock" in record.getMessage() and "not applied" in record.getMessage()
