"""nftables adapter: our table's full replaces and element updates as nf_tables netlink batches
(one kernel transaction each); libnftables only for the neighbours' tables (admission rules in a
host firewall's chains), with a context made per call and freed after it. Every call runs on
one dedicated worker thread: never on the event loop, and one thread also serializes our
nf_tables transactions."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .. import heap
from ..errors import KernelError
from ..model import AddressSet, NftState
from ..rules import nft as rules
from .nft_batch import Msg, encode_interval_set, translate
from .nft_netlink import SetElementWriter, TableQuery, encode_change

log = logging.getLogger(__name__)
_MANY = 256  # elements in one update past which its garbage is worth giving back (heap.release)


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
        self._elements = SetElementWriter(rules.TABLE)
        self._query = TableQuery()

    @staticmethod
    def _ctx() -> Any:
        """A fresh libnftables context: one kept would hold its cache of the whole ruleset (every
        element of our bypass sets, ~70 MB at 100k) for the life of the daemon."""
        import nftables  # Debian's python3-nftables; imported lazily so unit tests need no libnftables

        ctx = nftables.Nftables()
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
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
        rc, output, error = ctx.json_cmd(payload)  # output: the decoded JSON answer
        if rc != 0:
            raise KernelError(f"{what} failed: {(error or '').strip() or rc}")
        return output or {}

    async def table_exists(self, name: str, family: str = "inet") -> bool:
        return bool(await self._call(self._query.exists, name, family))

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
        """On the worker thread: encoding 100k elements must not stall the event loop."""
        self._elements.transact(self.replace_messages(state))
        heap.release()

    def replace_messages(self, state: NftState) -> list[Msg]:
        """One batch: the table rebuilt as `state` (the link sets kept and then set exactly, so a
        link proxied before stays proxied throughout), the elements from the packed intervals
        (encoding is cheap, ~40 ms at 100k: not kept between replaces, which are rare)."""
        elements = {
            rules.SET_BYPASS4: encode_interval_set(4, state.bypass.v4),
            rules.SET_BYPASS6: encode_interval_set(6, state.bypass.v6),
            rules.SET_LOCAL4: encode_interval_set(4, state.local.v4),
            rules.SET_LOCAL6: encode_interval_set(6, state.local.v6),
        }
        skeleton = rules.build_replace(
            dataclasses.replace(state, bypass=AddressSet(), local=AddressSet()), None, self._query.objects(rules.TABLE)
        )
        messages = translate(skeleton["nftables"], rules.FAMILY, rules.TABLE, elements)
        return messages + [m for change in rules.link_elements(state) for m in encode_change(change, rules.TABLE)]

    async def exists(self) -> bool:
        return await self.table_exists(rules.TABLE)

    async def update_elements(self, changes: list[rules.SetChange]) -> None:
        await self._call(self._update, changes)

    def _update(self, changes: list[rules.SetChange]) -> None:
        self._elements.apply(changes)
        if sum(len(c.add) + len(c.remove) for c in changes) > _MANY:  # a changed bypass list
            heap.release()

    async def delete(self) -> None:
        messages = translate(rules.build_delete()["nftables"], rules.FAMILY, rules.TABLE, {})
        await self._call(self._elements.transact, messages, "deleting table inet tproxyd")
        await self._call(heap.release)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._elements.close()
        self._query.close()
