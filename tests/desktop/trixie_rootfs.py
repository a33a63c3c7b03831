"""The cached Debian 13 ("trixie") rootfs with GNOME Shell 48 that the desktop tier's GNOME 48
session runs in (tests/desktop/container.py).

It lives beside the system tier's rootfs (tests/system/images.py: CACHE_DIR, the host's mirror,
the same lock-build-rename scheme), keyed by a hash of the suite and the package list, and is
never written to afterwards: every run mounts an overlay on it. The first build takes about
100 s and 1.1 GB."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from tests.system import images

SUITE = "trixie"
# debootstrap does not pick providers of virtual packages: libpam-systemd (default-logind) and
# dconf-gsettings-backend (gsettings-backend) are named here.
PACKAGES = (
    "gnome-shell",
    "gjs",
    "dbus",
    "dbus-user-session",
    "polkitd",
    "libpam-systemd",
    "systemd",
    "python3",
    "libglib2.0-bin",  # gsettings, gdbus
    "dconf-gsettings-backend",
    "dconf-service",
    "procps",
    "passwd",
    "libgl1-mesa-dri",  # software rendering for the headless virtual monitor
    "libegl-mesa0",
    "fonts-cantarell",
    "fonts-dejavu-core",
)
# Bump when the way the rootfs is built changes (not needed for PACKAGES: they are hashed).
RECIPE = 1
MUST_HAVE = ("usr/bin/gnome-shell", "usr/bin/dbus-daemon", "usr/bin/gsettings", "usr/bin/setpriv")
BUILD_PREFIX = f"gnome-{SUITE}-rootfs"


def key() -> str:
    return images._key({"suite": SUITE, "variant": images.VARIANT, "packages": sorted(PACKAGES), "recipe": RECIPE})


def ensure_rootfs(log: Path) -> tuple[Path, float]:
    """The cached GNOME Shell 48 rootfs, built if missing; returns (path, seconds spent building)."""
    target = images.CACHE_DIR / f"rootfs-gnome-{SUITE}-{key()}"
    if images._use(target):
        return target, 0.0
    # The build directory's name must not match the system tier's `.build-rootfs-*`: that tier
    # removes those as stale under its own lock, while this build may be running.
    with images._locked(BUILD_PREFIX):
        if images._use(target):  # another run built it while we waited for the lock
            return target, 0.0
        images._remove_stale_builds(BUILD_PREFIX)
        build = Path(tempfile.mkdtemp(prefix=f".build-{BUILD_PREFIX}-{key()}-", dir=images.CACHE_DIR))
        started = time.monotonic()
        try:
            images.debootstrap_into(
                build / "rootfs",
                target,
                SUITE,
                sorted(PACKAGES),
                images.host_mirror(),
                must_have=MUST_HAVE,
                log=log,
                timeout=1800,
            )
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return target, time.monotonic() - started


if __name__ == "__main__":  # build the cache by hand: python -m tests.desktop.trixie_rootfs
    logfile = Path(tempfile.gettempdir()) / "tproxyd-gnome-rootfs.log"
    path, seconds = ensure_rootfs(logfile)
    print(f"rootfs: {path} (built in {seconds:.0f} s)" if seconds else f"rootfs: {path} (cached)")
