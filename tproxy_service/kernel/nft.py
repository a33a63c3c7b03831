"""nftables adapter: full atomic replaces through libnftables JSON (everything but interface
names), set elements (interface names always) through netlink. libnftables is a blocking ctypes
library, so every call runs on one dedicated worker thread (never on the event loop; one thread
also serializes our nf_tables transactions)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ..errors import KernelError
from ..model import AddressSet, NftState
from ..rules import nft as rules
from .nft_netlink import SetElementWriter, table_exists, table_objects

log = logging.getLogger(__name__)


class EventWatch(Protocol):
    def pause(self) -> None: ...
    def resume(self) -> None: ...


class NftablesAdapter:
    def __init__(self, watch: EventWatch | None = None, on_missing: Callable[[str], None] | None = None) -> None:
        """`watch` is paused around full replaces (see monitors/nft_events.py); `on_missing` is
        told when the table vanished in that window."""
        self.watch = watch
        self.on_missing = on_missing
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft")
        self._local = threading.local()
        self._elements = SetElementWriter(rules.TABLE)
        # Encoded bypass elements for the AddressSet object they were made from (see _replace).
        self._bypass_key: AddressSet | None = None
        self._bypass_elements: tuple[list[Any], list[Any]] = ([], [])

    def _ctx(self) -> Any:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            import nftables  # Debian's python3-nftables; imported lazily so unit tests need no libnftables

            ctx = nftables.Nftables()
            ctx.set_json_output(True)
            ctx.set_handle_output(False)
            self._local.ctx = ctx
        return ctx

    def _run_json(self, payload: dict[str, Any], what: str) -> str:
        rc, output, error = self._ctx().json_cmd(payload)
        if rc != 0:
            lines = [line for line in (error or "").splitlines() if "Error:" in line]
            detail = lines[0].split("Error:", 1)[1].strip() if lines else f"libnftables returned {rc}"
            raise KernelError(f"{what} failed: {detail}")
        return str(output)

    async def _call(self, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def run(self, payload: dict[str, Any], what: str) -> None:
        """Run a batch on another table (a neighbour's), on the same worker thread as ours."""
        await self._call(self._run_json, payload, what)

    async def listing(self, payload: dict[str, Any], what: str) -> dict[str, Any]:
        """A `list` command's JSON answer, with rule handles."""
        return dict(await self._call(self._listing, payload, what))

    def _listing(self, payload: dict[str, Any], what: str) -> Any:
        ctx = self._ctx()
        ctx.set_handle_output(True)
        try:
            rc, output, error = ctx.json_cmd(payload)  # output: the decoded JSON answer
        finally:
            ctx.set_handle_output(False)
        if rc != 0:
            raise KernelError(f"{what} failed: {(error or '').strip() or rc}")
        return output or {}

    async def table_exists(self, name: str, family: str = "inet") -> bool:
        return bool(await self._call(table_exists, name, family))

    async def replace(self, state: NftState) -> None:
        """Atomically replace table inet tproxyd with `state` (nothing else is touched)."""
        if self.watch:
            self.watch.pause()
        try:
            await self._call(self._replace, state)
        finally:
            if self.watch:
                self.watch.resume()
        if self.on_missing and not await self.exists():
            self.on_missing("table deleted right after it was replaced")

    def _replace(self, state: NftState) -> None:
        """On the worker thread: building 100k elements must not stall the event loop."""
        if self._bypass_key is not state.bypass:  # the engine keeps one AddressSet per config
            self._bypass_elements = (
                rules.encode_intervals(4, state.bypass.v4),
                rules.encode_intervals(6, state.bypass.v6),
            )
            self._bypass_key = state.bypass
        existing = table_objects(rules.TABLE)
        self._run_json(rules.build_replace(state, self._bypass_elements, existing), "replacing table inet tproxyd")
        self._elements.apply(rules.link_elements(state))

    async def exists(self) -> bool:
        return await self.table_exists(rules.TABLE)

    async def update_elements(self, changes: list[rules.SetChange]) -> None:
        await self._call(self._elements.apply, changes)

    async def delete(self) -> None:
        await self._call(self._run_json, rules.build_delete(), "deleting table inet tproxyd")

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._elements.close()
