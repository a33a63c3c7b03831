"""The user's choices (per-link modes, the master switch) applied through the engine.

Control alone writes the engine's input (intent.Intent: the config, the choices, NetworkManager's
facts, the switched-off policy holds) and hands it over in one call.

A change is applied first and persisted only once the kernel took it: when the reconcile pass
fails (the engine has rolled the kernel back) or the file cannot be written, the previous
choices are restored too, so a failed call changes nothing. Changes are serialized; each one
waits for the pass that applies it. No D-Bus here: the bus layer authorizes, then calls in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from .engine import Engine, EngineStatus
from .errors import KernelError, TproxydError
from .intent import Intent, log_lines
from .model import Config, LinkChoice, NmFacts, ServiceState
from .nm_policy import prune_suppressed
from .state_store import Choices, StateStore

log = logging.getLogger(__name__)


class Control:
    def __init__(
        self,
        engine: Engine,
        store: StateStore,
        read_config: Callable[[], Awaitable[Config]],
        apply_config: Callable[[Config], Awaitable[int]],
        refresh: Callable[[], Awaitable[None]] | None = None,
        warnings: Callable[[], tuple[str, ...]] = tuple,
    ) -> None:
        """`read_config` reads and validates the config file (slow: list files; raises
        ConfigError); `apply_config` puts a read config in place and returns the engine ticket
        of the pass that applies it. `refresh` re-reads facts kept outside the kernel
        (NetworkManager's) before a Reapply; `warnings` says what the admin should know about the
        running config (the core's DNS)."""
        self._engine = engine
        self._warnings = warnings
        self._store = store
        self._read_config = read_config
        self._apply_config = apply_config
        self._refresh = refresh
        self._intent = engine.intent
        self._lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    # --- what the bus reads --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._intent.enabled

    @property
    def link_choices(self) -> dict[str, LinkChoice]:
        """ifname -> host | lan | both | auto: the config's defaults under the choices."""
        return self._intent.link_choices

    @property
    def status(self) -> EngineStatus:
        return self._engine.status

    @property
    def config(self) -> Config:
        return self._intent.config

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._warnings()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called after the choices, the config or the engine's status changed."""
        self._listeners.append(listener)
        self._engine.add_listener(lambda _status: listener())

    # --- start and config ----------------------------------------------------------------------

    def restore(self) -> None:
        """Load the persisted choices into the engine (before its first pass)."""
        choices = self._store.load()
        if choices.links or choices.enabled is not None:
            log.info("restored saved choices from %s", self._store.path)
        self._push(replace(self._intent, choices=choices), "restored choices")

    def use_config(self, config: Config) -> int:
        """A new config: its [links] become the defaults under the choices. Returns the ticket."""
        ticket = self._push(replace(self._intent, config=config), "config changed")
        self._notify()
        return ticket

    def set_network(self, nm: NmFacts, reason: str) -> int:
        """New NetworkManager facts (monitors/networkmanager.py); returns the engine's ticket."""
        before = self._intent.policy_holds
        intent = replace(self._intent, nm=nm, suppressed=prune_suppressed(self._intent.suppressed, nm))
        for line in log_lines(before, intent.policy_holds):
            log.info("%s", line)
        return self._push(intent, reason)

    # --- changes -------------------------------------------------------------------------------

    async def enable_link(self, ifname: str, choice: LinkChoice) -> None:
        await self._change(lambda c: Choices(c.enabled, {**c.links, ifname: choice}))

    async def disable_link(self, ifname: str) -> None:
        def disable(c: Choices) -> Choices:
            links = {k: v for k, v in c.links.items() if k != ifname}
            if ifname in self.config.link_defaults:  # a default: remember that it was switched off
                links[ifname] = LinkChoice.DISABLED
            return Choices(c.enabled, links)

        # A link a [[networkmanager.auto]] policy holds goes off too, until its connection leaves
        # the link (not saved: the next activation applies the policy again).
        await self._change(disable, release_policy=ifname)

    async def set_enabled(self, enabled: bool) -> None:
        await self._change(lambda c: Choices(enabled, c.links))

    async def reapply(self) -> None:
        if self._refresh is not None:
            await self._refresh()
        status = await self._engine.wait_for(self._engine.reapply("reapply requested"))
        if status.state is ServiceState.FAILED:
            raise KernelError(f"re-applying the rules failed: {status.last_error}")

    async def reload(self) -> None:
        """The one reload path (D-Bus Reload and SIGHUP). Raises ConfigError for a bad config
        (nothing changed), KernelError when the kernel refused the new rules (the previous
        config is then restored). Reading the files happens outside the change lock, so
        toggles go on meanwhile; reloads take turns."""
        async with self._reload_lock:
            config = await self._read_config()
            async with self._lock:
                previous = self.config
                status = await self._engine.wait_for(await self._apply_config(config))
                if status.state is ServiceState.FAILED:
                    error = status.last_error
                    await self._engine.wait_for(await self._apply_config(previous))
                    raise KernelError(f"applying the new config failed, the previous one is kept: {error}")

    async def _change(self, update: Callable[[Choices], Choices], release_policy: str | None = None) -> None:
        async with self._lock:
            before = self._intent
            new = update(before.choices)
            hold = before.policy_holds.get(release_policy) if release_policy is not None else None
            if new == before.choices and hold is None:
                return  # idempotent: nothing to apply or write
            suppressed = before.suppressed | ({(hold.connection.ifname, hold.connection.uuid)} if hold else set())
            status = await self._engine.wait_for(
                self._push(replace(before, choices=new, suppressed=suppressed), "choices changed")
            )
            if status.state is ServiceState.FAILED:
                error = status.last_error
                await self._revert(before)
                raise KernelError(f"applying the change failed and was rolled back: {error}")
            if new != before.choices:
                try:
                    await asyncio.to_thread(self._store.save, new)
                except OSError as e:
                    await self._revert(before)
                    raise TproxydError(f"could not save the choice in {self._store.path}: {e.strerror}") from None
            self._notify()

    async def _revert(self, before: Intent) -> None:
        """Back to the choices and suppressions before a failed change (newer facts kept)."""
        await self._engine.wait_for(
            self._push(replace(self._intent, choices=before.choices, suppressed=before.suppressed), "change reverted")
        )
        self._notify()

    def _push(self, intent: Intent, reason: str) -> int:
        self._intent = intent
        return self._engine.want(intent, reason)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
