"""How much freed memory the process keeps (glibc malloc). A 100k-entry bypass list passes
through tens of MB of short-lived objects on every parse and replace; without these, glibc keeps
most of that heap for good (measured in BENCHMARKS.md, "Footprint")."""

from __future__ import annotations

import contextlib
import ctypes

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_large_blocks_mapped() -> None:
    """Pin the mmap threshold: glibc raises it after each large free (up to 32 MB), after which
    MB-sized buffers (a replace's netlink batch) come from the heap and fragment it."""
    libc = _libc()
    with contextlib.suppress(AttributeError):  # not glibc
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release() -> None:
    """Give the free pages of every malloc arena back to the system."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)
