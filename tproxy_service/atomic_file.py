"""Replace a file atomically: a crash or power loss leaves the old content or the new, never half."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync of the directory.
    Raises OSError with the old file intact. `durable=False` skips both fsyncs: after a crash
    the file may then be empty or torn, which only a reader that checks the content can accept."""
    directory = path.parent
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # make the rename itself durable
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
