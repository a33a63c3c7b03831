"""A Debian container (bookworm or trixie) booted with systemd as PID 1, with tproxyd installed
by `make install` (docs/architecture.md, "systemd as PID 1 in a container", and its safety notes).

Layout of one run (all under `workdir`; besides it, the host gets only our cgroup directories,
removed afterwards, and the cache of tests/system/images.py):

    upper/ ovl-work/   the overlay's writable layer: the cached rootfs itself is never written
    root/              the overlay mount point (visible only in the holder's mount namespace)
    bus/               bound to the container's /run/dbus: its system bus is bus/system_bus_socket
    logs/              install.log, nspawn.log

Everything runs inside one private mount namespace and PID namespace whose init is a `sleep`
(the "holder"), entered with nsenter for each step. The holder is SIGKILL'd when pytest dies
(PR_SET_PDEATHSIG on `unshare`, `--kill-child` on its init), and the end of a PID namespace's
init kills every process in it and in the namespaces nested in it: so nspawn and the whole
container die with pytest, even with SIGKILL, and with the last process of the mount namespace
every mount of ours goes away. The main namespace's /run/systemd gets a tmpfs in there too,
because systemd-nspawn writes /run/systemd/nspawn/ and /run is on disk on these machines.

`make install` runs in a chroot into the overlay BEFORE the boot, not in the booted system:
the container has no network, and a chroot lets us bind the offline wheelhouse for exactly
that step; the install then takes no part in the boot (no race with dbus-daemon's inotify
reload of the new bus policy, which `make install` does not request); and the boot is then
exactly that of a machine rebooted after installing (units, bus policy and activation file
picked up at start). `make uninstall` runs in the booted system, where its `systemctl`
branch matters.

The container: `systemd-nspawn --boot --private-network --register=no --keep-unit` in its own
cgroup subtree, started with a clean environment, `--console=passive` (the console is a pty of
its own: no host file descriptor or device node becomes the container's console),
console-getty masked, /dev made by nspawn (its own device nodes). Its only links are the veth
pairs the tests create in its network namespace (never in the main one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dbus_fast import MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from tests import support
from tests.networkmanager_conf import networkmanager_conf
from tproxy_service.bus.call import method_call

from .images import UNSHARE_PRIVATE, die_with_parent

T = TypeVar("T")

CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
CGROUP_PREFIX = "tproxyd-systest-"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SRC = "/usr/src/tproxyd"  # the repository's working tree, copied into the container
WHEELS = "/mnt"  # the wheelhouse, bound read-only for `make install` only
NAMESPACES = ("mnt", "pid", "net", "uts", "ipc")

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"

# NetworkManager in a container without udev (nspawn mounts /sys read-only, so NM manages
# devices itself). The veth peers and the wire to the upstream namespace (tpxw) are ours, set up
# by the tests; NM leaves them alone.
NM_UNMANAGED = ("tpx*p", "tpxw")
# Units of the base image that have no business in this container. The Debian v2ray package
# enables its own vmess server; tproxyd runs v2ray through tproxyd-core.service.
MASKED_UNITS = ("console-getty.service", "v2ray.service")

_INSTALL = r"""
set -eu
R=$1 W=$2 SRC=$3 WHEELS=$4
mount -n -t proc proc "$R/proc"
# Own device nodes on a private tmpfs: nothing in the chroot touches the host's /dev inodes.
mount -n -t tmpfs -o mode=755 tproxyd-systest-dev "$R/dev"
for spec in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9"; do
    set -- $spec; mknod -m 666 "$R/dev/$1" c "$2" "$3"
done
mount -n -t tmpfs -o mode=1777 tproxyd-systest-tmp "$R/tmp"
mount -n -t tmpfs -o mode=755 tproxyd-systest-run "$R/run"
mount -n --bind "$W" "$R$WHEELS"
mount -n -o remount,bind,ro "$R$WHEELS"
exec chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    /bin/sh -c 'cd "$1" && exec make install PIP_ARGS="--no-index --find-links $2"' sh "$SRC" "$WHEELS"
"""

_BOOT = r"""
for cg in $TPROXYD_CGROUPS; do echo $$ > "$cg/cgroup.procs"; done
unset TPROXYD_CGROUPS
exec "$@"
"""


class ContainerError(RuntimeError):
    """The container could not be prepared, booted or stopped; the message has the logs."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Poll `probe` until it returns something other than None/False; fail with `what` at the
    deadline. A D-Bus error or an unreachable socket counts as "not yet"; any other exception
    is a bug and is raised at once."""
    errors: list[Exception] = []

    def attempt() -> T | None:
        try:
            return probe()
        except (BusError, OSError) as e:
            errors.append(e)
            return None

    try:
        return support.wait_until(attempt, timeout, what, interval)
    except AssertionError:
        detail = f" (last error: {errors[-1]})" if errors else ""
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}") from None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def ns_inode(pid: int, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


def processes_in_namespaces(inodes: dict[str, int]) -> list[str]:
    """Every live process in one of these namespaces (by inode), as "pid comm"."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for ns, inode in inodes.items():
            try:
                if os.stat(entry / "ns" / ns).st_ino == inode:
                    found.append(f"{entry.name} {_comm(int(entry.name))} ({ns})")
                    break
            except OSError:
                break
    return found


def kill_cgroup(cg: Path, timeout: float = 10) -> None:
    """SIGKILL what is left in a cgroup subtree of ours, then remove it (deepest first)."""
    if not cg.exists():
        return

    def empty() -> bool:
        pids = [p for f in cg.rglob("cgroup.procs") for p in f.read_text().split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        return not pids

    def removed(d: Path) -> bool:
        d.rmdir()  # EBUSY until the kernel has released the last task: retried by wait_for
        return True

    wait_for(f"the processes in {cg} to die", empty, timeout)
    for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        wait_for(f"rmdir {d}", functools.partial(removed, d), timeout)
    wait_for(f"rmdir {cg}", functools.partial(removed, cg), timeout)


def remove_stale_cgroups() -> None:
    """Cgroup subtrees of an earlier run of this harness whose pytest is gone (killed hard)."""
    for root in CGROUP_ROOTS:
        for cg in root.glob(f"{CGROUP_PREFIX}*"):
            owner = cg.name.removeprefix(CGROUP_PREFIX)
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                kill_cgroup(cg)


class Container:
    def __init__(self, rootfs: Path, wheels: Path, repo: Path, workdir: Path, suite: str) -> None:
        self.suite = suite
        self.rootfs = rootfs
        self.wheels = wheels
        self.repo = repo
        self.workdir = workdir
        self.name = f"tproxyd-systest-{suite}"
        self.upper = workdir / "upper"
        self.ovl_work = workdir / "ovl-work"
        self.root = workdir / "root"
        self.bus_dir = workdir / "bus"
        self.logs = workdir / "logs"
        self.cgroups = [root / f"{CGROUP_PREFIX}{os.getpid()}" for root in CGROUP_ROOTS if root.is_dir()]
        self.holder: subprocess.Popen[bytes] | None = None  # unshare
        self.holder_init = 0  # its child: PID 1 of the holder's PID namespace
        self.nspawn: subprocess.Popen[bytes] | None = None  # nsenter, parent of systemd-nspawn
        self.pid1 = 0  # the container's systemd (host PID)
        # Namespaces this run created: no process may be left in any of them afterwards.
        self.namespaces: dict[str, int] = {}
        self.timings: dict[str, float] = {}

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.bus_dir / 'system_bus_socket'}"

    # --- setup ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The overlay's upper layer: the source tree, the masks and NetworkManager's config."""
        for d in (self.upper, self.ovl_work, self.root, self.bus_dir, self.logs):
            d.mkdir(parents=True)
        src = self.upper / SRC.lstrip("/")
        shutil.copytree(
            self.repo,
            src,
            symlinks=True,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "*.egg-info"
            ),
        )
        for d in (src, *src.parents):  # new directories in the upper layer: 0755 like their lower twins
            if d == self.upper:
                break
            d.chmod(0o755)
        units = self.upper / "etc/systemd/system"
        units.mkdir(parents=True, mode=0o755)
        for unit in MASKED_UNITS:
            (units / unit).symlink_to("/dev/null")
        nm_conf = self.upper / "etc/NetworkManager/conf.d/50-systest-container.conf"
        nm_conf.parent.mkdir(parents=True, mode=0o755)
        nm_conf.write_text(networkmanager_conf(NM_UNMANAGED))
        for d in (self.upper / "etc", units.parent, nm_conf.parent.parent):
            d.chmod(0o755)

    def _in_holder(self, *args: str, log: Path | None = None, timeout: float = 30) -> None:
        cmd = ["nsenter", f"--target={self.holder_init}", "--mount", "--pid", "--", *args]
        out = open(log, "ab") if log else None  # noqa: SIM115 (closed below)
        try:
            proc = subprocess.run(
                cmd,
                env={"PATH": PATH},
                stdin=subprocess.DEVNULL,
                stdout=out or subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        finally:
            if out:
                out.close()
        if proc.returncode != 0:
            text = log.read_text()[-4000:] if log else proc.stdout.decode(errors="replace")
            raise ContainerError(f"{' '.join(args[:6])}... failed (rc {proc.returncode}):\n{text}")

    def start_holder(self) -> None:
        """The private mount + PID namespace (with its own /proc) and our mounts in it."""
        self.holder = subprocess.Popen(
            [*UNSHARE_PRIVATE, "sleep", "infinity"],
            env={"PATH": PATH},
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        holder = self.holder
        own = ns_inode(os.getpid(), "mnt")

        def init() -> int | None:
            if holder.poll() is not None:
                raise ContainerError(f"unshare exited ({holder.returncode})")
            return next((p for p in _children(holder.pid) if _comm(p) == "sleep" and ns_inode(p, "mnt") != own), None)

        self.holder_init = wait_for("the holder's namespaces", init, 10)
        for ns in ("mnt", "pid"):
            self.namespaces[f"holder {ns}"] = ns_inode(self.holder_init, ns)
        self._in_holder("mount", "-n", "-t", "tmpfs", "-o", "mode=755", "tproxyd-systest-rsd", "/run/systemd")
        self._in_holder(
            "mount",
            "-n",
            "-t",
            "overlay",
            "tproxyd-systest-root",
            "-o",
            f"lowerdir={self.rootfs},upperdir={self.upper},workdir={self.ovl_work}",
            str(self.root),
        )

    def install(self) -> None:
        """`make install` in a chroot (see the module doc), offline, from the wheelhouse. In a
        network namespace of its own (only lo): a runtime package missing from the rootfs or a
        distribution missing from the wheelhouse fails the install instead of being fetched."""
        started = time.monotonic()
        self._in_holder(
            "unshare",
            "--mount",
            "--net",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            _INSTALL,
            "sh",
            str(self.root),
            str(self.wheels),
            SRC,
            WHEELS,
            log=self.logs / "install.log",
            timeout=300,
        )
        self.timings["make install"] = time.monotonic() - started

    def boot(self, timeout: float = 60) -> None:
        for cg in self.cgroups:
            cg.mkdir()
        started = time.monotonic()
        with open(self.logs / "nspawn.log", "wb") as log:
            self.nspawn = subprocess.Popen(
                [
                    "nsenter",
                    f"--target={self.holder_init}",
                    "--mount",
                    "--pid",
                    "--",
                    "sh",
                    "-c",
                    _BOOT,
                    "sh",
                    "systemd-nspawn",
                    "--quiet",
                    f"--directory={self.root}",
                    f"--machine={self.name}",
                    "--boot",
                    "--private-network",
                    "--register=no",
                    "--keep-unit",
                    "--console=passive",
                    "--link-journal=no",
                    "--resolv-conf=off",
                    "--timezone=off",
                    f"--bind={self.bus_dir}:/run/dbus",
                ],
                # PID 1 must not inherit anything (a leaked DBUS_SYSTEM_BUS_ADDRESS hung a boot).
                # A cgroup2 view for the container (of its sub-cgroup in the host's
                # /sys/fs/cgroup/unified): systemd 257 refuses to run on cgroup v1, which is
                # what this v1/hybrid host would give it otherwise.
                env={
                    "PATH": PATH,
                    "TPROXYD_CGROUPS": " ".join(str(c) for c in self.cgroups),
                    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
                },
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        nspawn = self.nspawn

        def pid1() -> int | None:
            if nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited ({nspawn.returncode}):\n{self.log_tail('nspawn.log')}")
            for child in _children(nspawn.pid):  # nsenter -> systemd-nspawn -> systemd
                if _comm(child) == "systemd-nspawn":
                    return next((p for p in _children(child) if _comm(p) == "systemd"), None)
            return None

        self.pid1 = wait_for("the container's PID 1", pid1, timeout)
        for ns in NAMESPACES:
            self.namespaces[f"container {ns}"] = ns_inode(self.pid1, ns)

        def system_state() -> str | None:
            if nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited ({nspawn.returncode}):\n{self.log_tail('nspawn.log')}")
            state = self.get_property(SYSTEMD, SYSTEMD_PATH, MANAGER, "SystemState")
            return state if state in ("running", "degraded") else None

        state = wait_for("the container's systemd to finish booting", system_state, timeout, interval=0.1)
        self.timings["boot"] = time.monotonic() - started
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout
            raise ContainerError(f"the container booted {state}; failed units:\n{failed}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # --- using it ---------------------------------------------------------------------------------

    def run(
        self,
        *args: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces, its root), with a clean
        environment; as `user` (with that user's groups from the container's /etc) if given;
        its stdin is `input`, else /dev/null."""
        environment = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root" if user is None else "/", **(env or {})}
        cmd = [
            "nsenter",
            f"--target={self.pid1}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in environment.items()),
        ]
        if user is not None:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        what = f"in the container{f' as {user}' if user else ''}: {' '.join(args)}"
        return support.run(*cmd, *args, check=check, timeout=timeout, stdin=input, env={"PATH": PATH}, what=what)

    def in_netns(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A host tool (ip, nft) run in the container's network namespace only."""
        nsenter = ["nsenter", f"--target={self.pid1}", "--net", "--"]
        what = f"in the container's netns: {' '.join(args)}"
        return support.run(*nsenter, *args, check=check, env={"PATH": PATH}, what=what)

    async def _bus_call(
        self, dest: str, path: str, iface: str, member: str, signature: str, body: list[Any]
    ) -> list[Any]:
        bus = await MessageBus(bus_address=self.bus_address).connect()
        try:
            # Observing never starts anything: no D-Bus activation by the harness's own calls.
            reply = await bus.call(method_call(dest, path, iface, member, signature, body, MessageFlag.NO_AUTOSTART))
        finally:
            bus.disconnect()
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            raise BusError(reply.error_name or "", reply.body[0] if reply.body else "")
        return list(reply.body)

    def call(self, dest: str, path: str, iface: str, member: str, signature: str = "", *args: Any) -> list[Any]:
        """One D-Bus call on the container's system bus, from the host (as root)."""
        return asyncio.run(self._bus_call(dest, path, iface, member, signature, list(args)))

    def get_property(self, dest: str, path: str, iface: str, name: str) -> Any:
        (variant,) = self.call(dest, path, PROPERTIES, "Get", "ss", iface, name)
        return variant.value

    def unit_path(self, unit: str) -> str:
        (path,) = self.call(SYSTEMD, SYSTEMD_PATH, MANAGER, "LoadUnit", "s", unit)
        return str(path)

    def unit_property(self, unit: str, name: str, iface: str = UNIT) -> Any:
        return self.get_property(SYSTEMD, self.unit_path(unit), iface, name)

    # --- teardown ---------------------------------------------------------------------------------

    def stop(self, timeout: float = 30) -> list[str]:
        """Power the container off, end the holder, remove our cgroups and the overlay's layer.
        Returns the problems found (a container that had to be killed, leftovers)."""
        problems: list[str] = []
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.pid1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGRTMIN + 4)  # systemd as PID 1: power off
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"the container did not power off within {timeout:g}s; killed it")
        if self.holder is not None and self.holder.poll() is None:
            # Kills whatever is left in its PID namespace (and the nested container's).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.holder_init or self.holder.pid, signal.SIGKILL)
            self.holder.kill()
            self.holder.wait()
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.kill()
            self.nspawn.wait()
        for cg in self.cgroups:
            try:
                kill_cgroup(cg)
            except (OSError, TimeoutError) as e:
                problems.append(f"could not remove cgroup {cg}: {e}")
        with contextlib.suppress(TimeoutError):
            wait_for("the container's processes to be gone", lambda: not processes_in_namespaces(self.namespaces), 10)
        if left := processes_in_namespaces(self.namespaces):
            problems.append(f"processes left in the container's namespaces: {left}")
        else:  # no mount namespace of ours is left, so nothing is mounted on these any more
            for d in (self.upper, self.ovl_work, self.root):
                shutil.rmtree(d, ignore_errors=True)
        return problems


class BusError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


@contextlib.contextmanager
def booted(container: Container) -> Iterator[Container]:
    """prepare, mount, install, boot; always stopped and cleaned afterwards."""
    problems: list[str] = []
    try:
        container.prepare()
        container.start_holder()
        container.install()
        container.boot()
        yield container
    finally:
        problems = container.stop()
    assert not problems, "\n".join(problems)
