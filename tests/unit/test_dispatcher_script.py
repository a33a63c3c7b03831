"""nm-dispatcher/90-tproxyd with stand-ins for busctl/dbus-send that record their arguments:
which actions call Reapply, the exact call, the dbus-send fallback, exit 0 always, and hostile
interface names, connection ids and environment values (spaces, quotes, `$(...)`, globs,
newlines) that must never be evaluated. (Against a real bus and nm-dispatcher: tests/nm.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "nm-dispatcher" / "90-tproxyd"
CALLED = ("up", "down", "dhcp4-change", "dhcp6-change", "connectivity-change", "reapply")
IGNORED = ("pre-up", "pre-down", "vpn-pre-up", "vpn-up", "vpn-pre-down", "vpn-down", "hostname", "", "UP", "up ",
           "up;reapply", "*", "$(: > pwned)")  # fmt: skip
BUSCTL_ARGS = [
    "--system", "--timeout=2", "--allow-interactive-authorization=no", "call",
    "io.github.Tproxyd", "/io/github/Tproxyd", "io.github.Tproxyd.Manager1", "Reapply",
]  # fmt: skip
DBUS_SEND_ARGS = [
    "--system", "--print-reply", "--reply-timeout=2000", "--dest=io.github.Tproxyd", "/io/github/Tproxyd",
    "io.github.Tproxyd.Manager1.Reapply",
]  # fmt: skip
# Payloads use shell builtins only (PATH holds nothing but the fake tools): `: > FILE` creates it.
HOSTILE = [
    "wlan0; : > pwned",
    "$(: > pwned)",
    "`: > pwned-bq`",
    "x && : > pwned-and",
    "a b\tc\nd",
    "*",
    "-rf",
    "' \" \\",
]


def fake_tools(tmp_path: Path, names: tuple[str, ...] = ("busctl", "dbus-send")) -> Path:
    """A PATH directory whose busctl/dbus-send write their argv (NUL-separated) to a file each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > "{tmp_path}/{name}.$$"\n')
        tool.chmod(0o755)
    return bin_dir


def calls(tmp_path: Path, name: str) -> list[list[str]]:
    return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(tmp_path.glob(f"{name}.*"))]


def session_alive(sid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            return True
    return False


def run(tmp_path: Path, bin_dir: Path, args: list[str], env: dict[str, str] | None = None) -> int:
    """Run the script like nm-dispatcher (cwd /, its own session) and wait for anything it left
    in the background (the fake tools exit at once)."""
    proc = subprocess.Popen(
        [str(SCRIPT), *args],
        cwd=tmp_path,  # a glob that expanded would see pwned-* files here
        env={"PATH": str(bin_dir), **(env or {})},
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    rc = proc.wait(10)
    wait_until(lambda: not session_alive(proc.pid), 10, "the script's background job to finish")
    return rc


def test_script_is_executable_posix_sh() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize("action", CALLED)
def test_relevant_actions_call_reapply(tmp_path: Path, action: str) -> None:
    bin_dir = fake_tools(tmp_path)
    assert run(tmp_path, bin_dir, ["wlan0", action]) == 0
    assert calls(tmp_path, "busctl") == [BUSCTL_ARGS]
    assert calls(tmp_path, "dbus-send") == []


@pytest.mark.parametrize("action", IGNORED)
def test_other_actions_are_ignored(tmp_path: Path, action: str) -> None:
    bin_dir = fake_tools(tmp_path)
    assert run(tmp_path, bin_dir, ["wlan0", action]) == 0
    assert calls(tmp_path, "busctl") == [] and not list(tmp_path.glob("pwned*"))


def test_dbus_send_when_busctl_is_missing(tmp_path: Path) -> None:
    bin_dir = fake_tools(tmp_path, ("dbus-send",))
    assert run(tmp_path, bin_dir, ["wlan0", "up"]) == 0
    assert calls(tmp_path, "dbus-send") == [DBUS_SEND_ARGS]


def test_no_client_at_all_still_exits_0(tmp_path: Path) -> None:
    bin_dir = tmp_path / "empty"
    bin_dir.mkdir()
    assert run(tmp_path, bin_dir, ["wlan0", "up"]) == 0
    assert run(tmp_path, bin_dir, []) == 0  # no arguments at all


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_never_evaluated(tmp_path: Path, value: str) -> None:
    bin_dir = fake_tools(tmp_path)
    env = {
        "CONNECTION_ID": value,
        "CONNECTION_UUID": value,
        "DEVICE_IFACE": value,
        "DEVICE_IP_IFACE": value,
        "IP4_ADDRESS_0": value,
        "CONNECTIVITY_STATE": value,
        "DHCP4_HOST_NAME": value,
    }
    assert run(tmp_path, bin_dir, [value, "up"], env) == 0
    assert run(tmp_path, bin_dir, [value, value], env) == 0
    assert calls(tmp_path, "busctl") == [BUSCTL_ARGS]  # the fixed call, once (for "up")
    assert not list(tmp_path.glob("pwned*")), "a hostile value was executed"
