"""A throw-away Debian 13 container for the GNOME Shell 48 session: no systemd, no nspawn.

`unshare` makes a mount and a PID namespace; inside, an overlay on the cached rootfs
(trixie_rootfs.py; the cache is never written), a tmpfs /dev with device nodes of its own (the
host's are never bound), tmpfs /run, /tmp and /dev/shm, then `chroot`. Its PID 1 waits for EOF on
a pipe from the test: closing it (or the test dying) ends PID 1, and with it every process and
mount of the container. Host directories are bound in at the same path, so a path (a session
bus socket, the private system bus, a screenshot) means the same file on both sides. Commands
run inside through `nsenter` (prefix())."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.integration import harness as h
from tests.system import images

from .trixie_rootfs import ensure_rootfs

# Runs as the new PID namespace's first process: $1 rootfs, $2 workdir, then host dirs to bind.
SETUP = r"""
set -eu
lower=$1 w=$2; shift 2
r=$w/root
mkdir -p "$w/upper" "$w/work" "$r"
mount -n -t overlay tpg48-root -o "lowerdir=$lower,upperdir=$w/upper,workdir=$w/work" "$r"
mount -n -t proc proc "$r/proc"
mount -n -t tmpfs -o mode=755,nosuid tpg48-dev "$r/dev"
for spec in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
    set -- $spec "$@"; mknod -m 666 "$r/dev/$1" c "$2" "$3"; shift 3
done
mkdir -m 1777 "$r/dev/shm"; mount -n -t tmpfs -o mode=1777,nosuid,nodev tpg48-shm "$r/dev/shm"
ln -s /proc/self/fd "$r/dev/fd"
mount -n -t tmpfs -o mode=755,nosuid,nodev tpg48-run "$r/run"
mount -n -t tmpfs -o mode=1777,nosuid,nodev tpg48-tmp "$r/tmp"
for dir in "$@"; do mkdir -p "$r$dir"; mount -n --bind "$dir" "$r$dir"; done
echo ready
exec chroot "$r" /bin/sh -c 'read -r _ || true'
"""


class Container:
    def __init__(self, workdir: Path, binds: list[Path], log: Path) -> None:
        self.workdir = workdir
        self.binds = binds
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.init_pid = 0  # the container's PID 1, as the host sees it

    def start(self) -> None:
        rootfs, seconds = ensure_rootfs(self.log)
        if seconds:
            print(f"built the GNOME Shell 48 rootfs {rootfs} in {seconds:.0f} s")
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [*images.UNSHARE_PRIVATE, "/bin/sh", "-c", SETUP, "sh", str(rootfs), str(self.workdir),
                 *map(str, self.binds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd="/",
                preexec_fn=images.die_with_parent,
            )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise AssertionError(f"the trixie container did not start: {self.log.read_text()[-3000:]}")
        self.init_pid = h.wait_until(self._init_pid, 10, "the container's PID 1 to chroot")

    def _init_pid(self) -> int | None:
        """unshare's only child, once it has chrooted into the overlay."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        if len(children) != 1:
            return None
        pid = int(children[0])
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/root").resolve() == self.workdir / "root":
                return pid
        return None

    def prefix(self) -> list[str]:
        """What runs a command inside (in the container's namespaces and root, at /)."""
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--pid", "--root", "--wd"]

    def stop(self) -> None:
        """EOF to PID 1: the kernel kills everything in the PID namespace; the mounts go with it."""
        if self.proc is None:
            return
        with contextlib.suppress(BrokenPipeError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # unshare --kill-child takes PID 1 along
            self.proc.wait(15)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc = None
        left = self.processes()
        assert not left, f"processes of the container outlived it: {left}"

    def processes(self) -> list[int]:
        """Host PIDs of the processes whose root is the container's."""
        root = str(self.workdir / "root")
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and os.readlink(entry / "root") == root:
                    found.append(int(entry.name))
        return found


@contextlib.contextmanager
def container(workdir: Path, binds: list[Path]) -> Iterator[Container]:
    box = Container(workdir, binds, workdir / "container.log")
    try:
        box.start()
        yield box
    finally:
        box.stop()
