"""Reading the files a config names, bounded: regular files only, at most a given size, and
abandoned at once when tproxyd stops.

A path the admin wrote may name /dev/zero, a FIFO nobody writes to, or a 200 MB file: read
naively, each one hangs the reader or grows the daemon without limit. Here the file is opened
without blocking (a FIFO's open would wait for a writer), checked with fstat before a byte is
read, and read only up to its limit."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ConfigError, TproxydError

CHECK_EVERY = 4096  # lines between two looks at the cancel flag


class Cancelled(TproxydError):
    """tproxyd is stopping: the read was abandoned and nothing was applied."""

    def __init__(self) -> None:
        super().__init__("tproxyd is stopping; the config was not reloaded")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: Path, max_bytes: int, what: str, limit: str) -> bytes:
    """The content of the regular file `path`, at most `max_bytes`. `what` names the file in
    errors ("bypass file"), `limit` the setting that bounds it ("[bypass] max_file_bytes").
    Raises ConfigError."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"{what} {path} is {_kind(st.st_mode)}; only regular files are read")
    with os.fdopen(fd, "rb") as f:
        too_big = ConfigError(f"{what} {path} is larger than {max_bytes} bytes ({limit})")
        if st.st_size > max_bytes:
            raise too_big
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
        if len(data) > max_bytes:  # it grew since fstat
            raise too_big
        return data


def read_text(path: Path, max_bytes: int, what: str, limit: str) -> str:
    """read_bytes, decoded as UTF-8 (ConfigError otherwise)."""
    return decode(read_bytes(path, max_bytes, what, limit), path, what)


def decode(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None


def lines_within(
    text: str, path: Path, max_lines: int, what: str, section: str, cancel: threading.Event | None = None
) -> Iterator[str]:
    """The lines of `path`'s `text` (already read within its byte limit), within `max_lines`."""
    check_line_count(text, path, max_lines, what, section)
    return cancellable(text.splitlines(), cancel)


def check_line_count(content: str | bytes, path: Path, max_lines: int, what: str, section: str) -> None:
    """ConfigError when `content` has more than `max_lines` lines (a last line may lack its "\n")."""
    if isinstance(content, str):
        lines = content.count("\n") + (not content.endswith("\n"))
    else:
        lines = content.count(b"\n") + (not content.endswith(b"\n"))
    if lines > max_lines:
        raise ConfigError(f"{what} {path} has more than {max_lines} lines ({section} max_file_lines)")


def cancellable(lines: Iterable[str], cancel: threading.Event | None) -> Iterator[str]:
    for index, line in enumerate(lines):
        if cancel is not None and index % CHECK_EVERY == 0 and cancel.is_set():
            raise Cancelled
        yield line
