"""The user's choices (per-link modes, the master switch) applied through the engine.

A change is applied first and persisted only once the kernel took it: when the reconcile pass
fails (the engine has rolled the kernel back) or the file cannot be written, the previous
choices are restored too, so a failed call changes nothing. Changes are serialized; each one
waits for the pass that applies it. No D-Bus here: the bus layer authorizes, then calls in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from .engine import Engine, EngineStatus
from .errors import InvalidArgument, KernelError, TproxydError
from .model import Config, LinkMode, ServiceState
from .state_store import AUTO, DISABLED, Choices, StateStore, configured_links

log = logging.getLogger(__name__)


def parse_mode_argument(text: str) -> str:
    """EnableLink's mode argument -> a persisted choice ("" means auto)."""
    if text == "":
        return AUTO
    if text in {m.value for m in LinkMode}:
        return text
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise InvalidArgument(f"no such mode {shown!r}: use 'host', 'lan', 'both' or '' (auto)")


def choice_mode(choice: str) -> LinkMode | None:
    """A persisted choice -> the engine's mode; None = auto, which the engine resolves from
    NetworkManager (nm_policy: lan on a shared/hotspot connection, else host)."""
    return None if choice == AUTO else LinkMode(choice)


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
        self._choices = Choices()
        self._lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    # --- what the bus reads --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._choices.enabled is not False

    @property
    def links(self) -> dict[str, str]:
        """ifname -> "host" | "lan" | "both" | "auto": the config's defaults under the choices."""
        return configured_links(self._engine.config.links, self._choices)

    @property
    def status(self) -> EngineStatus:
        return self._engine.status

    @property
    def config(self) -> Config:
        return self._engine.config

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
        self._choices = self._store.load()
        if self._choices.links or self._choices.enabled is not None:
            log.info("restored saved choices from %s", self._store.path)
        self._push()

    def use_config(self, config: Config) -> int:
        """A new config: its [links] become the defaults under the choices. Returns the ticket."""
        self._engine.set_config(config)
        ticket = self._push()
        self._notify()
        return ticket

    # --- changes -------------------------------------------------------------------------------

    async def enable_link(self, ifname: str, choice: str) -> None:
        await self._change(lambda c: Choices(c.enabled, {**c.links, ifname: choice}))

    async def disable_link(self, ifname: str) -> None:
        def disable(c: Choices) -> Choices:
            links = {k: v for k, v in c.links.items() if k != ifname}
            if ifname in self._engine.config.links:  # a default: remember that it was switched off
                links[ifname] = DISABLED
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
                previous = self._engine.config
                status = await self._engine.wait_for(await self._apply_config(config))
                if status.state is ServiceState.FAILED:
                    error = status.last_error
                    await self._engine.wait_for(await self._apply_config(previous))
                    raise KernelError(f"applying the new config failed, the previous one is kept: {error}")

    async def _change(self, update: Callable[[Choices], Choices], release_policy: str | None = None) -> None:
        async with self._lock:
            previous = self._choices
            new = update(previous)
            released = release_policy is not None and self._engine.suppress_policy(release_policy)
            if new == previous and not released:
                return  # idempotent: nothing to apply or write
            self._choices = new
            status = await self._engine.wait_for(self._push())
            if status.state is ServiceState.FAILED:
                error = status.last_error
                await self._revert(previous, release_policy if released else None)
                raise KernelError(f"applying the change failed and was rolled back: {error}")
            if new != previous:
                try:
                    await asyncio.to_thread(self._store.save, new)
                except OSError as e:
                    await self._revert(previous, release_policy if released else None)
                    raise TproxydError(f"could not save the choice in {self._store.path}: {e.strerror}") from None
            self._notify()

    async def _revert(self, previous: Choices, released: str | None = None) -> None:
        self._choices = previous
        if released is not None:
            self._engine.unsuppress_policy(released)
        await self._engine.wait_for(self._push())
        self._notify()

    def _push(self) -> int:
        links: Mapping[str, LinkMode | None] = {name: choice_mode(c) for name, c in self.links.items()}
        self._engine.set_links(links)
        return self._engine.set_enabled(self.enabled)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
