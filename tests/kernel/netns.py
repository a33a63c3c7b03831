"""Run a test body in a fresh, anonymous network namespace (a forked child that unshares
CLONE_NEWNET). The namespace dies with the child, so nothing can be left behind, and the
main namespace is never touched."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import traceback
from collections.abc import Callable
from typing import Any

import pytest

CLONE_NEWNET = 0x40000000


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, nftables)")
    for tool in ("nft", "ip"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            pytest.skip(f"needs the {tool} command")


def _child(fn: Callable[[], Any], conn: Any) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        sh("ip link set lo up")
        fn()
        conn.send(None)
    except BaseException:
        conn.send(traceback.format_exc())
    finally:
        conn.close()


def run_in_netns(fn: Callable[[], Any], timeout: float = 60) -> None:
    require_root()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, child))
    proc.start()
    try:
        if not parent.poll(timeout):
            raise AssertionError(f"test body did not finish within {timeout} s")
        error = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if error:
        raise AssertionError("in the test namespace:\n" + error)


def sh(cmd: str, check: bool = True) -> str:
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{cmd!r} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout
