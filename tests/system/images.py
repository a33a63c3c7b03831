"""The cached inputs of the system tier: a debootstrapped bookworm rootfs and an offline wheelhouse.

Both live under CACHE_DIR (default /var/cache/tproxyd-tests, TPROXYD_TEST_CACHE overrides it),
keyed by a hash of what goes into them, so a changed package list or dependency gets a new entry
and an unchanged one is reused by every run on the machine. Each entry is built in a temporary
directory next to it and renamed into place (a rename is atomic), under a lock so that two runs
never build the same entry at once; whatever a killed build left behind is removed by the next.
The cached entries are never written to afterwards: every run mounts an overlay on the rootfs.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CACHE_DIR = Path(os.environ.get("TPROXYD_TEST_CACHE", "/var/cache/tproxyd-tests"))
SUITE = "bookworm"
VARIANT = "minbase"
# Everything the container runs, installed at debootstrap time (the install runs offline, so
# `make install` must find its RUNTIME_PACKAGES already there; it then skips apt). The
# Makefile's RUNTIME_PACKAGES are added to these at run time (runtime_packages()).
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "polkitd",
    "libpam-systemd",  # provides default-logind, which polkitd depends on (debootstrap does not pick providers)
    "python3",
    "python3-venv",
    "python3-nftables",
    "python3-systemd",
    "libnftables1",
    "nftables",
    "v2ray",
    "iproute2",
    "network-manager",
    "make",
    "procps",
    "passwd",  # useradd, groupadd, usermod for the test user
)
# Bump when the way the rootfs is built changes (not needed for PACKAGES: they are hashed).
ROOTFS_RECIPE = 1
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SOURCES_LIST = Path("/etc/apt/sources.list")


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when pytest dies (kept across exec of non-setuid programs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# The command after this runs in a private mount namespace and in a PID namespace (with its own
# /proc) that dies with `unshare` (--kill-child): it leaves no mount and no process on the host.
UNSHARE_PRIVATE = ("unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                   "--propagation", "private", "--")  # fmt: skip


class ImageError(RuntimeError):
    """Building a cached image failed; the message carries the tool's output."""


def _key(description: object) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def runtime_packages(repo: Path) -> list[str]:
    """The Makefile's RUNTIME_PACKAGES (what `make install` would otherwise apt-get install)."""
    proc = subprocess.run(
        [
            "make",
            "-s",
            "--no-print-directory",
            "-C",
            str(repo),
            "--eval=tproxyd-systest-runtime: ; @echo $(RUNTIME_PACKAGES)",
            "tproxyd-systest-runtime",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.split()


def rootfs_packages(repo: Path) -> list[str]:
    return sorted({*PACKAGES, *runtime_packages(repo)})


def rootfs_key(packages: list[str]) -> str:
    return _key({"suite": SUITE, "variant": VARIANT, "packages": packages, "recipe": ROOTFS_RECIPE})


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (the only network these machines have)."""
    if DEBIAN_SOURCES.exists():
        for line in DEBIAN_SOURCES.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    if SOURCES_LIST.exists():
        for line in SOURCES_LIST.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and "debian" in fields[1]:
                return fields[-3] if fields[1].startswith("[") else fields[1]
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_stale_builds(prefix: str) -> None:
    """Called with the lock held: any build directory present now belongs to a dead build."""
    for stale in CACHE_DIR.glob(f".build-{prefix}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _run(args: list[str], log: Path, timeout: float, details: Path | None = None) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            preexec_fn=die_with_parent,
        )
        if proc.returncode != 0 and details is not None and details.exists():
            out.write(f"\n--- {details.name} (the build directory is removed) ---\n".encode())
            out.write(details.read_bytes()[-20000:])
    if proc.returncode != 0:
        raise ImageError(f"{args[0]} failed (rc {proc.returncode}); last lines of {log}:\n{log.read_text()[-3000:]}")


def ensure_rootfs(repo: Path, log: Path) -> tuple[Path, float]:
    """The cached rootfs for PACKAGES and the Makefile's RUNTIME_PACKAGES, built if missing;
    returns (path, seconds spent building)."""
    packages = rootfs_packages(repo)
    key = rootfs_key(packages)
    target = CACHE_DIR / f"rootfs-{key}"
    if target.is_dir():
        return target, 0.0
    with _locked("rootfs"):
        if target.is_dir():  # another run built it while we waited for the lock
            return target, 0.0
        _remove_stale_builds("rootfs")
        build = Path(tempfile.mkdtemp(prefix=f".build-rootfs-{key}-", dir=CACHE_DIR))
        started = time.monotonic()
        try:
            tree = build / "rootfs"
            # debootstrap mounts /proc and /sys inside the tree while it installs: in a private
            # mount namespace, a killed build cannot leave those mounts on the host; in a PID
            # namespace that dies with `unshare` (--kill-child), none of its processes outlives it.
            _run(
                [
                    *UNSHARE_PRIVATE,
                    "debootstrap",
                    f"--variant={VARIANT}",
                    f"--include={','.join(packages)}",
                    SUITE,
                    str(tree),
                    host_mirror(),
                ],
                log,
                timeout=1200,
                details=tree / "debootstrap" / "debootstrap.log",
            )
            for needed in ("lib/systemd/systemd", "usr/bin/v2ray", "usr/sbin/NetworkManager", "usr/bin/make"):
                if not (tree / needed).exists():
                    raise ImageError(f"the debootstrapped rootfs lacks /{needed}")
            # apt's package lists and downloaded .debs are not needed (nothing is installed later).
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (tree / cache).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            os.rename(tree, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return target, time.monotonic() - started


def _runtime_lock(repo: Path) -> Path:
    """The hash-pinned distributions `make install` installs (build backend included)."""
    return repo / "requirements" / "runtime.txt"


def ensure_wheelhouse(repo: Path, log: Path) -> Path:
    """Every distribution `make install` needs (the hash-pinned lock), downloaded on the host
    (which reaches PyPI) for the container (which reaches nothing): `make install
    PIP_ARGS="--no-index --find-links DIR"`. The container's python is the same Debian 3.11."""
    lock = _runtime_lock(repo)
    key = _key({"lock": lock.read_text(), "python": list(sys.version_info[:2])})
    target = CACHE_DIR / f"wheels-{key}"
    if target.is_dir():
        return target
    with _locked("wheels"):
        if target.is_dir():
            return target
        _remove_stale_builds("wheels")
        build = Path(tempfile.mkdtemp(prefix=f".build-wheels-{key}-", dir=CACHE_DIR))
        try:
            tree = build / "wheels"
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--disable-pip-version-check",
                    "--dest",
                    str(tree),
                    "--require-hashes",
                    "-r",
                    str(lock),
                ],
                log,
                timeout=600,
            )
            tree.chmod(0o755)
            os.rename(tree, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return target


if __name__ == "__main__":  # build the caches by hand: python -m tests.system.images
    logfile = Path(tempfile.gettempdir()) / "tproxyd-images.log"
    repo_dir = Path(__file__).resolve().parents[2]
    print("wheelhouse:", ensure_wheelhouse(repo_dir, logfile))
    path, seconds = ensure_rootfs(repo_dir, logfile)
    print(f"rootfs: {path} (built in {seconds:.0f} s)" if seconds else f"rootfs: {path} (cached)")
