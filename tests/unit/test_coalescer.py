"""The coalescer the engine and the NetworkManager monitor share: requests during a run coalesce
into one more run, tickets wait for a run that started after them, a crash releases the waiters."""

from __future__ import annotations

import asyncio

from tproxy_service.coalescer import Coalescer

from ..support import async_test, wait_until_async


@async_test
async def test_requests_during_a_run_coalesce_into_one_more() -> None:
    runs: list[list[str]] = []
    release = asyncio.Event()

    async def job(reasons: list[str]) -> None:
        runs.append(reasons)
        if len(runs) == 1:
            await release.wait()

    loop = Coalescer(job, "test")
    loop.start()
    first = loop.request("a")
    await wait_until_async(lambda: len(runs) == 1, 10, "the first run")
    tickets = [loop.request(r) for r in ("b", "c", "d")]
    release.set()
    await asyncio.wait_for(loop.wait_for(tickets[-1]), 10)
    await loop.wait_for(first)
    assert runs == [["a"], ["b", "c", "d"]]
    await loop.stop()


@async_test
async def test_a_crashing_run_releases_its_waiters_and_the_loop_goes_on() -> None:
    calls: list[str] = []

    async def job(reasons: list[str]) -> None:
        calls.extend(reasons)
        if reasons == ["boom"]:
            raise RuntimeError("a bug")

    after: list[None] = []

    async def pause() -> None:
        after.append(None)

    loop = Coalescer(job, "test", after=pause)
    loop.start()
    await asyncio.wait_for(loop.wait_for(loop.request("boom")), 10)
    await asyncio.wait_for(loop.wait_for(loop.request("next")), 10)
    assert calls == ["boom", "next"] and len(after) >= 1
    await loop.stop()


@async_test
async def test_stop_ends_the_loop_even_when_the_run_turns_the_cancellation_into_an_error() -> None:
    """dbus-fast fails a pending call with EOFError when its connection closes: a run cancelled
    at that moment ends with that error, not CancelledError. stop() must still end the loop (it
    used to wait for it forever, and tproxyd never exited on SIGTERM)."""
    started = asyncio.Event()

    async def job(reasons: list[str]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # a D-Bus call that never answers
        except asyncio.CancelledError:
            raise EOFError from None  # what the closed connection's reader delivers instead

    loop = Coalescer(job, "test")
    loop.start()
    loop.request("a")
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.ensure_future(loop.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert done, "stop() never returned: the loop went on after its cancellation"
