"""Supervises the proxy core: keeps its generated config current, starts and stops its systemd
unit as the engine wants, and decides when the core is *ready* (transparent sockets on the
tproxy port for every family, from the kernel's socket table). Every change of the core's
state is reported through `on_change(reason)`, which the daemon turns into an engine request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from ..atomic_file import write_atomic
from ..bounded_read import read_text
from ..errors import ConfigError
from ..kernel.sockets import core_listening
from ..model import Config, CoreStatus
from .dns_route import dns_warnings
from .exposure import open_proxy_warnings
from .systemd import SystemdError, UnitStatus
from .v2ray_config import build_core_config, inbound_tags, locate, parse_user_config, render

log = logging.getLogger(__name__)
CORE_CONFIG = "core.json"
CORE_ENV = "core.env"
# Readiness is checked when the unit's state changes, then retried while the unit is active but
# not listening yet: first after READY_POLL, the gap doubling up to READY_POLL_MAX, for at most
# READY_PATIENCE (a core that never listens waits for its next state change). A ready core is
# not polled: nothing wakes tproxyd while nothing changes.
READY_POLL = 0.02
READY_POLL_MAX = 1.0
READY_PATIENCE = 60.0
TEST_TIMEOUT = 20.0
_CITED_LINE = re.compile(r"at line (\d+) char \d+")
MAX_CORE_CONFIG_BYTES = 16 << 20
RETRY_UNREACHABLE = 5.0  # s between attempts to reach an unreachable systemd manager


class UnitPort(Protocol):
    status: UnitStatus

    async def connect(self) -> None: ...
    async def start(self) -> str: ...
    async def stop(self) -> str: ...
    async def restart(self) -> str: ...
    def close(self) -> None: ...


async def render_checked(config: Config) -> tuple[str, tuple[str, ...]]:
    """The core config text for `config`, validated by `<binary> -test`, and the warnings about
    it (dns_route.dns_warnings, exposure.open_proxy_warnings); raises ConfigError."""
    core = config.core
    source = str(core.config) if core.config else "the built-in core config"
    user = None
    if core.config is not None:
        text = await asyncio.to_thread(
            read_text, core.config, MAX_CORE_CONFIG_BYTES, "core config", "a core config is at most 16 MiB"
        )
        user = parse_user_config(text, source)
    merged = build_core_config(user, config.tproxy, source, core.sniffing)
    text = render(merged)
    warnings = dns_warnings(user, config.tproxy, inbound_tags(config.tproxy)) + open_proxy_warnings(user)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="tproxyd-core-test-") as f:
        f.write(text)
        f.flush()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(core.binary),
                "-test",
                "-config",
                f.name,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as e:
            raise ConfigError(f"cannot run the core binary {core.binary}: {e.strerror}") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), TEST_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise ConfigError(f"{core.binary} -test did not finish within {TEST_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
        why = next((line for line in lines if "panic" in line or "failed" in line.lower()), lines[-1] if lines else "")
        # "failed to read config file at line 49 char 15" cites the merged temporary file.
        why = _CITED_LINE.sub(lambda m: f"at {locate(merged, int(m.group(1)), source)}", why)
        raise ConfigError(f"the core rejects {source}: {why.strip()[:400]}")
    return text, warnings


class CoreSupervisor:
    def __init__(
        self,
        config: Config,
        make_unit: Callable[[Callable[[UnitStatus], None]], UnitPort],
        on_change: Callable[[str], None],
    ) -> None:
        """`make_unit(listener)` builds the systemd client that reports the unit's property
        changes to `listener` (this supervisor's on_unit_change)."""
        self._config = config
        self.unit = make_unit(self.on_unit_change)
        self._on_change = on_change
        self._wanted = False
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._retry = False  # the last job could not reach systemd: try again on the next want
        self._text = ""  # the core config last written
        self.warnings: tuple[str, ...] = ()  # about the core config last written
        self.status = CoreStatus(active_state="inactive")

    # --- config ---------------------------------------------------------------------------------

    async def prepare(self, config: Config) -> bool:
        """Validate and write the core config for `config`; True when its content changed.
        Raises ConfigError (nothing written) for a config the core would refuse."""
        text, warnings = await render_checked(config)
        self._config = config
        if warnings != self.warnings:
            for warning in warnings:
                log.warning("core config %s: %s", config.core.config or "(built-in)", warning)
            self.warnings = warnings
        changed = text != self._text
        if changed:
            runtime = config.runtime_dir
            await asyncio.to_thread(write_atomic, runtime / CORE_CONFIG, text.encode(), 0o600)
            await asyncio.to_thread(
                write_atomic, runtime / CORE_ENV, f"TPROXYD_CORE_BINARY={config.core.binary}\n".encode(), 0o600
            )
            self._text = text
        return changed

    async def reload(self, config: Config) -> bool:
        """New config: rewrite the core config and restart the core only if it changed."""
        changed = await self.prepare(config)
        if changed and self._wanted:
            await self.settle()
            async with self._lock:
                log.info("core config changed: restarting %s", self._config.core.unit)
                await self._job(self.unit.restart)
        return changed

    # --- running --------------------------------------------------------------------------------

    async def want(self, run: bool) -> None:
        """Start or stop the core when the want changes. The job runs in the background: the
        engine's pass must not wait for it (a start queued behind systemd's own auto-restart can
        take RestartSec); progress arrives through the unit's property changes. Crashes are left
        to the unit's Restart=, so a want that did not change issues no job."""
        self._ensure_poller()
        if run == self._wanted and not self._retry:
            return
        self._wanted = run
        self._retry = False
        previous = self._job_task
        self._job_task = asyncio.create_task(self._run_job(run, previous), name="core-job")

    async def settle(self) -> None:
        """Wait for the last start/stop job (used on shutdown)."""
        if self._job_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._job_task

    async def _run_job(self, run: bool, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # jobs stay in the order they were asked for
            with contextlib.suppress(asyncio.CancelledError):
                await previous
        if run != self._wanted:
            return  # superseded while waiting
        async with self._lock:
            await self._job(self.unit.start if run else self.unit.stop)

    async def _job(self, job: Callable[[], Awaitable[str]]) -> None:
        try:
            await self.unit.connect()
            result = await job()
            if result not in ("done", "skipped"):
                self._set(detail=f"systemd job for {self._config.core.unit} ended with '{result}'")
        except SystemdError as e:
            self._set(active_state="unreachable", ready=False, detail=str(e))
            self._retry = True
            # Try again later: the manager may come (back) at any time.
            asyncio.get_running_loop().call_later(RETRY_UNREACHABLE, self._on_change, "retrying the systemd manager")

    def on_unit_change(self, unit: UnitStatus) -> None:
        """Called by the systemd client for every property change of the unit."""
        ready = self.status.ready and unit.active_state == "active"
        self._set(active_state=unit.active_state, ready=ready)
        self._ensure_poller()  # a restarted core (say) is checked afresh

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_readiness(), name="core-readiness")

    async def _poll_readiness(self) -> None:
        """Check the socket table until the core listens (bounded, see READY_PATIENCE); stop
        once it does or the unit is down. The next unit state change starts a new round."""
        gap = READY_POLL
        deadline = asyncio.get_running_loop().time() + READY_PATIENCE
        while True:
            if not self._wanted or self.status.active_state != "active":
                if self.status.ready:
                    self._set(ready=False)
                return
            if await self._check_ready() or asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(gap)
            gap = min(gap * 2, READY_POLL_MAX)

    async def _check_ready(self) -> bool:
        settings = self._config.tproxy
        ready, why = await asyncio.to_thread(core_listening, settings.port, settings.ipv6, settings.udp)
        if ready != self.status.ready or (not ready and why != self.status.detail):
            self._set(ready=ready, detail="" if ready else why)
        return ready

    def _set(self, **changes: object) -> None:
        new = replace(self.status, **changes)  # type: ignore[arg-type]
        if new != self.status:
            self.status = new
            self._on_change(f"core {new.active_state}{', ready' if new.ready else ''}")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
