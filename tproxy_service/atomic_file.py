"""Replace a file atomically: a crash or power loss leaves the old content or the new, never half."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync of the directory.
    Raises OSError with the old file intact."""
    directory = path.parent
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # make the rename itself durable
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
