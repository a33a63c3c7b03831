"""A real systemd manager for tests, without systemd as PID 1 (docs/architecture.md, "A systemd
manager without systemd as PID 1"):
`systemd --user` run as root in a private mount namespace with a tmpfs on /run/systemd (so it
believes it was booted with systemd), its own cgroup subtree, and a private XDG_RUNTIME_DIR/HOME.
Its D-Bus API is on $XDG_RUNTIME_DIR/bus; units it starts run as root. A unit joins a test's
network namespace with a drop-in `NetworkNamespacePath=/run/netns/NS`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support import stop_process, wait_until

CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))

_LAUNCH = r"""
for root in "$@"; do echo $$ > "$root/cgroup.procs"; done
mount -n -t tmpfs -o mode=755 tproxyd-test-rsd /run/systemd
mkdir -p /run/systemd/system
# The nodes systemd mounts over what a unit may not see (ProtectHome=, ProtectKernelTunables=,
# ProtectKernelLogs=, InaccessiblePaths=): PID 1 makes them at boot; without them such a unit
# fails with 226/NAMESPACE. (A socket node cannot be made from the shell; no unit needs one.)
mkdir -p /run/systemd/inaccessible && cd /run/systemd/inaccessible
mkdir -m 0 dir && : > reg && chmod 0 reg && mkfifo -m 0 fifo && mknod -m 0 chr c 0 0 && mknod -m 0 blk b 0 0
cd /
mount -n --bind "$CONSOLE" /dev/console
exec /lib/systemd/systemd --user --log-target=console --log-level=info
"""


class UserManager:
    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.runtime_dir = workdir / "xdg-run"
        self.home = workdir / "home"
        self.unit_dir = self.home / ".config" / "systemd" / "user"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.runtime_dir / 'bus'}"

    @property
    def cgroups(self) -> list[Path]:
        return [root / self.name for root in CGROUP_ROOTS if root.is_dir()]

    def start(self, timeout: float = 15) -> None:
        for d in (self.runtime_dir, self.unit_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.chmod(0o700)
        self.console.write_text("")
        for cg in self.cgroups:
            cg.mkdir(exist_ok=True)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "HOME": str(self.home),
            "CONSOLE": str(self.console),
        }
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                _LAUNCH,
                "sh",
                *[str(c) for c in self.cgroups],
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self.proc
        with contextlib.suppress(AssertionError):  # reported below, with the manager's console
            wait_until(lambda: (self.runtime_dir / "bus").exists() or proc.poll() is not None, timeout, "its bus")
        if not (self.runtime_dir / "bus").exists():
            raise RuntimeError(f"systemd --user did not come up:\n{self.console.read_text()[-2000:]}")

    def install_unit(self, source: Path, dropin: str = "") -> None:
        shutil.copy(source, self.unit_dir / source.name)
        if dropin:
            d = self.unit_dir / f"{source.name}.d"
            d.mkdir(exist_ok=True)
            (d / "50-test.conf").write_text(dropin)
        self.systemctl("daemon-reload")

    def systemctl(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(
            ["systemctl", "--user", *args],
            env={"XDG_RUNTIME_DIR": str(self.runtime_dir), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
        )
        if check and out.returncode:
            raise RuntimeError(f"systemctl --user {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def stop(self) -> None:
        """Stop every unit, then the manager (by our PID); remove its cgroups."""
        if self.proc is not None and self.proc.poll() is None:
            self.systemctl("stop", "default.target", "--no-block", check=False)
            stop_process(self.proc, timeout=15)
        for cg in self.cgroups:
            _kill_and_remove_cgroup(cg)


def _kill_and_remove_cgroup(cg: Path) -> None:
    """Units of a dead manager may linger in its subtree: kill them (they are ours), then rmdir."""
    if not cg.exists():
        return

    def killed_all() -> bool:
        pids = [int(p) for f in cg.rglob("cgroup.procs") for p in f.read_text().split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    wait_until(killed_all, 5, f"no process left in {cg}")
    for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    cg.rmdir()
