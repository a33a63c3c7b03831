"""A real dockerd (Debian's docker.io) in the gateway namespace. It runs under `nsenter --net`
(`ip netns exec` remounts /sys, which breaks its cgroup detection) in a mount namespace of its
own, with tmpfs over /etc/docker and /run and its data, exec root and socket in the test's
directory; its containers' cgroups live under `tpe-docker`, removed afterwards. The one image is
imported from the host's /bin/sleep and libc: no registry is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from tests.support import run, stop_process, wait_until

DOCKERD = Path("/usr/sbin/dockerd")
DOCKER = Path("/usr/bin/docker")
CGROUP_PARENT = "tpe-docker"
IMAGE = "tpe-sleep:1"
_LAUNCH = 'mount -n -t tmpfs tpe-docker /etc/docker && mount -n -t tmpfs tpe-docker /run && exec "$@"'
_IMAGE_FILES = ("/bin/sleep", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2")


def missing() -> str | None:
    for path in (DOCKERD, DOCKER, Path("/etc/docker"), *map(Path, _IMAGE_FILES)):
        if not path.exists():
            return f"{path} is missing (Debian package docker.io; make deps)"
    return None


class Dockerd:
    def __init__(self, workdir: Path, ns: str) -> None:
        self.dir = workdir
        self.ns = ns
        self.socket = workdir / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            "nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--mount", "--propagation", "private",
            "sh", "-c", _LAUNCH, "dockerd",
            str(DOCKERD), "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
            "--pidfile", str(self.dir / "exec" / "dockerd.pid"), "-H", f"unix://{self.socket}",
            f"--cgroup-parent={CGROUP_PARENT}", "--storage-driver=vfs", "--log-level=warn",
        ]  # fmt: skip
        with (self.dir / "dockerd.log").open("ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        wait_until(self._up, 60, "dockerd answering on its socket")

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"dockerd exited with {self.proc.returncode}: {self.log()[-2000:]}")
        return self.docker("version", check=False).returncode == 0

    def log(self) -> str:
        return (self.dir / "dockerd.log").read_text(errors="replace")

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            str(DOCKER), *args, check=check, timeout=60, env={**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        )

    def run_container(self, name: str) -> int:
        """A container on the default bridge (docker0) that only sleeps; returns its PID."""
        rootfs = self.dir / "image.tar"
        with tarfile.open(rootfs, "w") as tar:
            for path in _IMAGE_FILES:
                tar.add(os.path.realpath(path), arcname=path.lstrip("/"))
        self.docker("import", str(rootfs), IMAGE)
        self.docker("run", "-d", "--name", name, IMAGE, "/bin/sleep", "3600")
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", name).stdout)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False)
            stop_process(self.proc, timeout=30)
            self.proc = None
        for controller in Path("/sys/fs/cgroup").iterdir():  # deepest first: rmdir needs them empty
            parent = controller / CGROUP_PARENT
            if parent.is_dir() and not parent.is_symlink():
                for d in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    d.rmdir()
                parent.rmdir()
        shutil.rmtree(self.dir / "data", ignore_errors=True)
