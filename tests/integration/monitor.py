"""`tproxyctl monitor --json` run as a user, its events collected by a reader thread."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from typing import Any

from . import harness as h


class Monitor:
    def __init__(self, user: h.User, bus: h.PrivateBus) -> None:
        self.proc = h.user_popen(user, [str(h.TPROXYCTL), "monitor", "--json"], bus.env())
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"tproxyctl monitor exited ({self.proc.returncode})")
            with self._lock:
                return next((e for e in self.events if predicate(e)), None)

        return h.wait_until(find, timeout, what)

    def subscribed(self, timeout: float = 10) -> dict[str, Any]:
        """The initial values, printed once the monitor's matches are in place: a change made
        after this returns is never missed."""
        return self.wait_for(lambda e: e["event"] == "initial", "the monitor's initial values", timeout)["changed"]

    def changed(self, prop: str, value: Any, timeout: float = 10) -> dict[str, Any]:
        return self.wait_for(
            lambda e: e["event"] == "changed" and prop in e["changed"] and e["changed"][prop] == value,
            f"PropertiesChanged {prop}={value!r}",
            timeout,
        )

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()
