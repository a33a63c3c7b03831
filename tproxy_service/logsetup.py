"""Logging to the journal when systemd runs us, to stderr otherwise; and sd_notify."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="tproxyd")
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tproxyd: %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def sd_notify(state: str) -> None:
    """Tell systemd about readiness/status; a no-op outside systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon  # type: ignore[attr-defined]

        daemon.notify(state)
    except ImportError:
        logging.getLogger(__name__).debug("python-systemd missing; not notifying %s", state)
    except OSError as e:  # a stale NOTIFY_SOCKET must never break a reconcile pass
        logging.getLogger(__name__).debug("sd_notify failed: %s", e)
