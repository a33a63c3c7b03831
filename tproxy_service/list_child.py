"""A changed CIDR list, parsed in a short-lived child process (what a Reload uses).

Parsing 100k lines makes hundreds of thousands of small Python objects at once. In the daemon
they left the allocator's arenas fragmented (each Reload of a changed list kept ~2 MB more, up to
~18 MB) and held the GIL in tens-of-ms stretches, which D-Bus calls waited behind. In a child both
stay there. The daemon sends the bytes it read (within [bypass] max_file_bytes) on stdin and gets
back the packed IPv4 and IPv6 intervals on stdout, or the error's one line on stderr (exit 2).

Start-up parses in the daemon itself: nothing long-lived exists yet to fragment around, and the
child's interpreter start (~40 ms) would count against start to ready."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from .bounded_read import Cancelled
from .errors import ConfigError
from .list_files import parse_list_bytes
from .model import AddressSet

_CANCEL_POLL_S = 0.1
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# ~15k lines: below, the child's start (~40 ms) costs more than the parse, whose garbage is small.
SMALL_LIST_BYTES = 256 << 10


def parse_in_child(
    data: bytes, path: Path, max_lines: int, cancel: threading.Event | None = None, small: int = SMALL_LIST_BYTES
) -> AddressSet:
    """list_files.parse_list_bytes, run in a child process; the same result, the same ConfigError.
    A list under `small` bytes is parsed in this process."""
    if len(data) < small:
        return parse_list_bytes(data, path, max_lines, cancel)
    # -P: not the working directory on sys.path, only this very package's location.
    argv = [sys.executable, "-P", "-m", __name__, str(path), str(max_lines)]
    env = {**os.environ, "PYTHONPATH": _PACKAGE_ROOT}
    pipe = subprocess.PIPE
    with subprocess.Popen(argv, env=env, stdin=pipe, stdout=pipe, stderr=pipe) as child:
        pending: bytes | None = data
        while True:
            try:
                out, err = child.communicate(pending, timeout=_CANCEL_POLL_S)
                break
            except subprocess.TimeoutExpired:
                pending = None  # communicate() goes on sending what it was given
                if cancel is not None and cancel.is_set():
                    child.kill()
                    child.communicate()
                    raise Cancelled from None
    if cancel is not None and cancel.is_set():  # `systemctl stop` signals the child too
        raise Cancelled
    if child.returncode == 2:
        raise ConfigError(err.decode(errors="replace").strip())
    why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
    try:
        if child.returncode == 0:
            return AddressSet.from_bytes(out)
    except ValueError:
        why = ["a malformed result"]
    raise ConfigError(f"parsing CIDR list file {path} failed: {why[0]}")


def main(argv: list[str]) -> int:
    path, max_lines = Path(argv[0]), int(argv[1])
    try:
        addresses = parse_list_bytes(sys.stdin.buffer.read(), path, max_lines)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    sys.stdout.buffer.write(addresses.to_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
