"""The cached inputs of the system tier: a debootstrapped Debian rootfs per suite (bookworm,
trixie) and an offline wheelhouse for that rootfs's python.

Both live under CACHE_DIR (default /var/cache/tproxyd-tests, TPROXYD_TEST_CACHE overrides it),
keyed by the suite and a hash of what goes into them, so a changed package list or dependency gets
a new entry and an unchanged one is reused by every run on the machine. Each entry is built in a
temporary directory next to it and renamed into place (a rename is atomic), under a lock so that
two runs never build the same entry at once; whatever a killed build left behind is removed by the
next. The cached entries are never written to afterwards (every run mounts an overlay on the
rootfs); each use touches the entry, and entries nobody used for MAX_AGE_DAYS are removed.
The packages come from the Debian mirror of the host's apt sources: no mirror address is written
here, and a host without one gets a clear error.
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
from collections.abc import Iterable, Iterator
from pathlib import Path

CACHE_DIR = Path(os.environ.get("TPROXYD_TEST_CACHE", "/var/cache/tproxyd-tests"))
SUITES = ("bookworm", "trixie")  # Debian 12 and Debian 13
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
APT_SOURCES = Path("/etc/apt")
# Cache entries (rootfs-*, wheels-*) unused for this long are removed when another one is built.
MAX_AGE_DAYS = float(os.environ.get("TPROXYD_TEST_CACHE_MAX_AGE_DAYS", "14"))


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


def rootfs_key(suite: str, packages: list[str]) -> str:
    return _key({"suite": suite, "variant": VARIANT, "packages": packages, "recipe": ROOTFS_RECIPE})


def _apt_sources(apt_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every `deb` source in apt's sources (one-line and deb822 formats)."""
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        for line in path.read_text().splitlines() if path.is_file() else []:
            fields = line.split("#", 1)[0].split()
            if fields[:1] == ["deb"]:
                if len(fields) > 1 and fields[1].startswith("["):  # options: [arch=amd64 signed-by=...]
                    fields = [fields[0], *fields[next(i for i, f in enumerate(fields) if f.endswith("]")) + 1 :]]
                if len(fields) >= 3:
                    yield fields[1], [fields[2]]
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            entry: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ", "\t")):
                    name, value = line.split(":", 1)
                    entry[name.strip().lower()] = value.strip()
            if "deb" in entry.get("types", "").split() and entry.get("enabled", "yes") != "no":
                for uri in entry.get("uris", "").split():
                    yield uri, entry.get("suites", "").split()


def host_mirror(apt_dir: Path = APT_SOURCES) -> str:
    """The Debian mirror the host's apt uses (the only network these machines have): the first
    `deb` source of a release itself (not its -security or -updates pocket)."""
    for uri, suites in _apt_sources(apt_dir):
        if any("-" not in suite and "/" not in suite for suite in suites):
            return uri
    raise ImageError(
        f"no Debian mirror in the host's apt sources ({apt_dir}/sources.list, {apt_dir}/sources.list.d): "
        "the container tiers install their packages only from the mirror the host's apt uses"
    )


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


def _use(entry: Path) -> bool:
    """Whether a cache entry exists; marks it used now (its mtime), which keeps it from pruning."""
    try:
        os.utime(entry)
    except FileNotFoundError:
        return False
    return entry.is_dir()


def prune(prefix: str, max_age_days: float = MAX_AGE_DAYS) -> list[Path]:
    """Called with the lock held: removes the `prefix`-* entries nobody used for max_age_days (an
    older package list, a suite or python no longer tested). Returns what it removed."""
    deadline = time.time() - max_age_days * 86400
    removed = []
    for entry in CACHE_DIR.glob(f"{prefix}-*"):
        if entry.is_dir() and entry.stat().st_mtime < deadline:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


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


def debootstrap_into(
    tree: Path,
    target: Path,
    suite: str,
    packages: Iterable[str],
    mirror: str,
    must_have: Iterable[str],
    log: Path,
    timeout: float,
) -> None:
    """Debootstraps `suite` with `packages` into `tree`, checks that every `must_have` path is
    there, drops apt's caches and renames the tree to `target` (the last step: a cache entry
    exists only once it is complete)."""
    # debootstrap mounts /proc and /sys inside the tree while it installs: in a private
    # mount namespace, a killed build cannot leave those mounts on the host; in a PID
    # namespace that dies with `unshare` (--kill-child), none of its processes outlives it.
    _run(
        [
            *UNSHARE_PRIVATE,
            "debootstrap",
            f"--variant={VARIANT}",
            f"--include={','.join(packages)}",
            suite,
            str(tree),
            mirror,
        ],
        log,
        timeout=timeout,
        details=tree / "debootstrap" / "debootstrap.log",
    )
    for needed in must_have:
        if not (tree / needed).exists():
            raise ImageError(f"the debootstrapped {suite} rootfs lacks /{needed}")
    # apt's package lists and downloaded .debs are not needed (nothing is installed later).
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (tree / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    os.rename(tree, target)


def ensure_rootfs(repo: Path, log: Path, suite: str) -> tuple[Path, float]:
    """The cached `suite` rootfs for PACKAGES and the Makefile's RUNTIME_PACKAGES, built if
    missing; returns (path, seconds spent building)."""
    packages = rootfs_packages(repo)
    key = rootfs_key(suite, packages)
    target = CACHE_DIR / f"rootfs-{suite}-{key}"
    if _use(target):
        return target, 0.0
    mirror = host_mirror()  # before the lock and the build: a host without one fails at once
    with _locked("rootfs"):
        if _use(target):  # another run built it while we waited for the lock
            return target, 0.0
        _remove_stale_builds("rootfs")
        prune("rootfs")
        build = Path(tempfile.mkdtemp(prefix=f".build-rootfs-{key}-", dir=CACHE_DIR))
        started = time.monotonic()
        try:
            debootstrap_into(
                build / "rootfs",
                target,
                suite,
                packages,
                mirror,
                must_have=("lib/systemd/systemd", "usr/bin/v2ray", "usr/sbin/NetworkManager", "usr/bin/make"),
                log=log,
                timeout=1200,
            )
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return target, time.monotonic() - started


def _runtime_lock(repo: Path) -> Path:
    """The hash-pinned distributions `make install` installs (build backend included)."""
    return repo / "requirements" / "runtime.txt"


def rootfs_python(rootfs: Path) -> str:
    """The X.Y version of the rootfs's python3 (Debian's /usr/bin/python3 -> python3.X)."""
    name = os.readlink(rootfs / "usr/bin/python3")
    version = name.removeprefix("python")
    if not version.replace(".", "").isdigit():
        raise ImageError(f"cannot tell the python version of {rootfs} (/usr/bin/python3 -> {name})")
    return version


def ensure_wheelhouse(repo: Path, log: Path, rootfs: Path) -> Path:
    """Every distribution `make install` needs (the hash-pinned lock), downloaded on the host
    (which reaches PyPI) as wheels for the rootfs's python (bookworm: 3.11, trixie: 3.13) for
    the container (which reaches nothing): `make install PIP_ARGS="--no-index --find-links DIR"`."""
    python = rootfs_python(rootfs)
    lock = _runtime_lock(repo)
    key = _key({"lock": lock.read_text(), "python": python})
    target = CACHE_DIR / f"wheels-py{python}-{key}"
    if _use(target):
        return target
    with _locked("wheels"):
        if _use(target):
            return target
        _remove_stale_builds("wheels")
        prune("wheels")
        build = Path(tempfile.mkdtemp(prefix=f".build-wheels-{key}-", dir=CACHE_DIR))
        try:
            tree = build / "wheels"
            # Wheels only: another python's wheels cannot be built here (and need no compiler there).
            only_wheels = ["--only-binary=:all:", f"--python-version={python}", "--implementation=cp"]
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--disable-pip-version-check",
                    *only_wheels,
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


if __name__ == "__main__":  # build the caches by hand: python -m tests.system.images [SUITE...]
    logfile = Path(tempfile.gettempdir()) / "tproxyd-images.log"
    repo_dir = Path(__file__).resolve().parents[2]
    for wanted in sys.argv[1:] or SUITES:
        path, seconds = ensure_rootfs(repo_dir, logfile, wanted)
        print(f"rootfs: {path} (built in {seconds:.0f} s)" if seconds else f"rootfs: {path} (cached)")
        print("wheelhouse:", ensure_wheelhouse(repo_dir, logfile, path))
