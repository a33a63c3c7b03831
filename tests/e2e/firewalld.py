"""A real firewalld 1.3 (Debian's, stock configuration) in the gateway namespace, on a private
system bus with its shipped bus policy. firewall-cmd finds it through DBUS_SYSTEM_BUS_ADDRESS."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.integration.harness import BUS_CONF
from tests.support import run, stop_process, wait_until

STOCK_CONFIG = Path("/etc/firewalld")
BUS_POLICY = Path("/usr/share/dbus-1/system.d/FirewallD.conf")
# `ip netns exec` gives firewalld a mount namespace of its own: a tmpfs over /run keeps its
# temporary files (/run/firewalld) off the host.
_LAUNCH = 'mount -n -t tmpfs tpe-firewalld /run && exec "$@"'


def missing() -> str | None:
    for path in ("/usr/sbin/firewalld", "/usr/bin/firewall-cmd", str(BUS_POLICY), str(STOCK_CONFIG)):
        if not os.path.exists(path):
            return f"{path} is missing (Debian package firewalld; make deps)"
    return None


class Firewalld:
    def __init__(self, workdir: Path, ns: str, bus_address: str | None = None) -> None:
        """On a bus of its own (start_bus), or on `bus_address`, one that loads BUS_POLICY."""
        self.dir = workdir
        self.ns = ns
        self.config = workdir / "etc"
        self.bus_dir = workdir / "bus"
        self.address = bus_address or f"unix:path={self.bus_dir}/system_bus_socket"
        self.bus: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start_bus(self) -> None:
        (self.bus_dir / "system.d").mkdir(parents=True)
        (self.bus_dir / "services").mkdir()
        (self.bus_dir / "bus.conf").write_text(BUS_CONF.format(dir=self.bus_dir, extra_listen=""))
        shutil.copy(BUS_POLICY, self.bus_dir / "system.d")
        with (self.bus_dir / "daemon.log").open("wb") as log:
            self.bus = subprocess.Popen(
                ["dbus-daemon", f"--config-file={self.bus_dir / 'bus.conf'}", "--nofork", "--nopidfile"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        wait_until(lambda: (self.bus_dir / "system_bus_socket").exists(), 10, "firewalld's private bus")

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        if not self.config.exists():
            shutil.copytree(STOCK_CONFIG, self.config)  # the stock configuration, never the host's files
        with (self.dir / "firewalld.log").open("ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "sh", "-c", _LAUNCH, "firewalld",
                 "/usr/sbin/firewalld", "--nofork", "--nopid", "--system-config", str(self.config),
                 "--log-target", "file", "--log-file", str(self.dir / "firewalld.file.log")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address},
            )  # fmt: skip
        wait_until(self._running, 60, "firewalld running")

    def _running(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"firewalld exited with {self.proc.returncode}: {self.log()[-2000:]}")
        return self.cmd("--state", check=False).stdout.strip() == "running"

    def log(self) -> str:
        logs = (self.dir / "firewalld.log", self.dir / "firewalld.file.log")
        return "".join(p.read_text(errors="replace") for p in logs if p.exists())

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}
        return run("firewall-cmd", *args, check=check, timeout=60, env=env)

    def runtime_state(self) -> str:
        """Everything firewall-cmd shows of the runtime configuration."""
        parts = [self.cmd(*q).stdout for q in (("--list-all-zones",), ("--list-all-policies",), ("--get-ipsets",))]
        parts.append(self.cmd("--direct", "--get-all-rules").stdout)
        return "\n".join(parts)

    def permanent_files(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.config)): p.read_bytes() for p in sorted(self.config.rglob("*")) if p.is_file()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=30)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self.bus is not None:
            stop_process(self.bus)
            self.bus = None
