"""A real ufw (Debian's, iptables-nft) in the gateway namespace. Every ufw command runs in a
mount namespace of its own where a temporary copy of /etc/ufw covers the host's (ufw writes its
state there) and a tmpfs covers /run (its lock), so the host's files are never touched."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support import run

from .neighbours import iptables_save

STOCK_CONFIG = Path("/etc/ufw")
_LAUNCH = 'mount -n --bind "$0" /etc/ufw && mount -n -t tmpfs tpe-ufw /run && exec "$@"'


def missing() -> str | None:
    for tool in ("/usr/sbin/ufw", "/usr/sbin/iptables-save", "/usr/sbin/ip6tables-save"):
        if not Path(tool).exists():
            return f"{tool} is missing (Debian packages ufw, iptables; make deps)"
    return None


class Ufw:
    def __init__(self, workdir: Path, ns: str) -> None:
        self.ns = ns
        self.config = workdir / "etc-ufw"
        shutil.copytree(STOCK_CONFIG, self.config)  # ENABLED=no, default deny incoming

    def in_sandbox(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            "ip", "netns", "exec", self.ns, "sh", "-c", _LAUNCH, str(self.config), *args, check=check, timeout=60
        )

    def cmd(self, *args: str) -> str:
        return self.in_sandbox("ufw", *args).stdout

    def iptables_save(self) -> str:
        """Both families' iptables-save, without packet counters and the timestamp comments."""
        return iptables_save(self.in_sandbox("iptables-save").stdout + self.in_sandbox("ip6tables-save").stdout)
