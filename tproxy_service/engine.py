"""The reconcile pass, its apply and its rollback (docs/architecture.md, "The reconcile pass").

Every trigger calls `request(reason)`. Requests coalesce (coalescer.py): however many arrive
while a pass runs, one more pass follows. A pass reads the kernel facts, computes the desired state with
pure functions, and applies only the difference: set elements when links, local subnets or the
bypass list changed (O(change)), one atomic table replace when the settings changed, the bypass
list changed wholesale, or drift was seen.
A failed apply rolls back to the last applied state and is reported in the status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .coalescer import Coalescer
from .desired import apply_failure_policy, bypass_set, compute_desired, service_state, too_wide_subnets
from .errors import KernelError
from .intent import Intent
from .model import Config, CoreStatus, DesiredState, Facts, LinkMode, NftState, RoutingState, ServiceState
from .rules.nft import SetChange, element_changes
from .rules.routing import build_routing

log = logging.getLogger(__name__)
MIN_RETRY_DELAY = 0.2  # s before retrying after a failed pass; doubles up to MAX_RETRY_DELAY
MAX_RETRY_DELAY = 5.0


class NftPort(Protocol):
    async def exists(self) -> bool: ...
    async def replace(self, state: NftState) -> None: ...
    async def update_elements(self, changes: list[SetChange]) -> None: ...
    async def delete(self) -> None: ...


class RoutingPort(Protocol):
    async def ensure(self, state: RoutingState) -> None: ...
    async def remove(self, state: RoutingState) -> None: ...


class FirewallPort(Protocol):
    """Host firewalls that must let diverted packets in (kernel/admission.py); returns what
    cannot work and the command that fixes it."""

    async def admit(self, mark: int, lan_links: frozenset[str]) -> str | None: ...


class FactsPort(Protocol):
    async def read(self) -> Facts: ...


class CorePort(Protocol):
    """The core supervisor (proxycore/supervisor.py): `want` starts/stops it, `status` says if it is ready."""

    status: CoreStatus

    async def want(self, run: bool) -> None: ...


@dataclass(frozen=True)
class EngineStatus:
    state: ServiceState = ServiceState.OFF
    active_links: tuple[str, ...] = ()
    last_error: str = ""
    core_state: str = "inactive"  # the core unit's ActiveState ("unsupervised" without a supervisor)


@dataclass
class _Applied:
    """What we last put in the kernel; `known=False` until the first pass (a crashed run may
    have left anything behind, so the first pass replaces or removes unconditionally)."""

    nft: NftState | None = None
    routing: RoutingState = field(default_factory=RoutingState)
    known: bool = False


def _union(a: RoutingState, b: RoutingState) -> RoutingState:
    return RoutingState(
        rules=tuple(dict.fromkeys(a.rules + b.rules)),
        routes=tuple(dict.fromkeys(a.routes + b.routes)),
    )


def _minus(a: RoutingState, b: RoutingState) -> RoutingState:
    return RoutingState(
        rules=tuple(r for r in a.rules if r not in b.rules),
        routes=tuple(r for r in a.routes if r not in b.routes),
    )


class Engine:
    def __init__(
        self,
        config: Config,
        nft: NftPort,
        routing: RoutingPort,
        facts: FactsPort,
        core: CorePort | None = None,
        firewalls: tuple[FirewallPort, ...] = (),
    ) -> None:
        self._nft = nft
        self._firewalls = firewalls
        self._routing = routing
        self._facts = facts
        self._core = core
        self._core_was_ready = False
        self._listeners: list[Callable[[EngineStatus], None]] = []
        # What the user wants (the config, the choices, NetworkManager's facts): Control's to write.
        self._intent = Intent(config)
        self._bypass = bypass_set(config)
        self._applied = _Applied()
        self._too_wide: tuple[str, ...] = ()  # connected prefixes logged as too wide to bypass
        self._nft_drift = False
        self._routing_drift = False
        self._verify = False
        self._passes = Coalescer(self._guarded_pass, "reconcile", after=self._back_off)
        self.status = EngineStatus()
        self._retry_delay = MIN_RETRY_DELAY
        self.passes = 0  # reconcile passes run (for tests of coalescing)

    # --- inputs ---------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._intent.config

    @property
    def intent(self) -> Intent:
        return self._intent

    @property
    def proxied_links(self) -> Mapping[str, LinkMode]:
        """Every link to proxy, with its mode (see Intent.proxied_links)."""
        return self._intent.proxied_links

    @property
    def diverting(self) -> bool:
        """Our table is (as far as we know) in the kernel."""
        return self._applied.nft is not None

    def add_listener(self, listener: Callable[[EngineStatus], None]) -> None:
        """Called with the new status after every pass that changed it."""
        self._listeners.append(listener)

    def want(self, intent: Intent, reason: str) -> int:
        """What the user wants now (Control's one call); returns the ticket of the pass that applies it."""
        if intent.config is not self._intent.config:
            self._bypass = bypass_set(intent.config)
        self._intent = intent
        return self.request(reason)

    def reapply(self, reason: str = "reapply") -> int:
        """A pass that also re-checks what others may have removed: policy routing is re-ensured
        and the table's existence checked (cheap), instead of trusting the applied-state cache."""
        self._verify = True
        return self.request(reason, routing_drift=True)

    def request(self, reason: str, *, nft_drift: bool = False, routing_drift: bool = False) -> int:
        """Ask for a reconcile pass; returns a ticket for `wait_for`."""
        self._nft_drift |= nft_drift
        self._routing_drift |= routing_drift
        return self._passes.request(reason)

    async def wait_for(self, ticket: int) -> EngineStatus:
        """Wait until a pass that started after `ticket` was requested has finished."""
        await self._passes.wait_for(ticket)
        return self.status

    async def reconcile(self, reason: str) -> EngineStatus:
        return await self.wait_for(self.request(reason))

    async def arm(self) -> None:
        """Before anything slow at startup (the core's `-test`, the bus): put the diversion in
        place with the core counted as not ready, so that under failure_policy closed the proxy
        chain's drop blocks the links until the core listens. A table a stopped tproxyd kept is
        taken over in place. A failure is left to the first pass."""
        try:
            facts = await self._facts.read()
            desired = compute_desired(self.config, self.proxied_links, self._intent.enabled, facts, self._bypass)
            desired = apply_failure_policy(desired, False, self.config.tproxy.failure_policy)
            if desired.nft is None:
                return
            await self._apply(self._applied, desired, False, False)
        except KernelError as e:
            log.warning("could not block the proxied links early: %s; the first pass retries", e)
            return
        self._applied = _Applied(desired.nft, desired.routing, known=True)
        log.info("blocking %s until the core listens", ", ".join(desired.active_links) or "the proxied links")

    # --- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        self._passes.start()

    async def _guarded_pass(self, reasons: list[str]) -> None:
        try:
            await self._pass(reasons)
        except Exception as e:  # a bug must not kill the loop: report and keep serving
            log.exception("reconcile pass crashed")
            self._publish(EngineStatus(ServiceState.FAILED, (), f"internal error: {e}", self.status.core_state))

    async def _back_off(self) -> None:
        """After a failed pass, wait before the next one: a failing apply causes netlink events
        (our own rollback) that would otherwise re-trigger it hundreds of times a second."""
        if self.status.state is ServiceState.FAILED:
            await asyncio.sleep(self._retry_delay)
            self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_DELAY)
        else:
            self._retry_delay = MIN_RETRY_DELAY

    async def _pass(self, reasons: list[str]) -> None:
        self.passes += 1
        log.debug("reconcile: %s", ", ".join(dict.fromkeys(reasons)))
        nft_drift, routing_drift, verify = self._nft_drift, self._routing_drift, self._verify
        self._nft_drift = self._routing_drift = self._verify = False
        try:
            facts = await self._facts.read()
        except Exception as e:
            self._publish(
                EngineStatus(ServiceState.FAILED, (), f"reading network state failed: {e}", self.status.core_state)
            )
            return
        nm = self.config.networkmanager
        standby = nm.enabled and bool(nm.auto)  # policy links come and go: keep the table armed
        desired = compute_desired(self.config, self.proxied_links, self._intent.enabled, facts, self._bypass, standby)
        self._log_too_wide(facts)
        wanted = desired.nft is not None
        core = await self._drive_core(wanted)
        policy = self.config.tproxy.failure_policy
        desired = apply_failure_policy(desired, core.ready, policy)
        previous = self._applied
        try:
            if verify and previous.nft is not None and not await self._nft.exists():
                nft_drift = True
            await self._apply(previous, desired, nft_drift, routing_drift)
        except KernelError as e:
            log.error("apply failed, rolling back: %s", e)
            await self._rollback(previous, desired)
            self._publish(EngineStatus(ServiceState.FAILED, self.status.active_links, str(e), core.active_state))
            return
        self._applied = _Applied(desired.nft, desired.routing, known=True)
        problem = await self._admit(desired.nft)
        state = service_state(wanted, core, self._core_was_ready, policy)
        error = core.detail if state in (ServiceState.DEGRADED, ServiceState.BLOCKED) else ""
        if problem and state is ServiceState.ACTIVE:  # diverted lan traffic would die at the firewall
            state, error = ServiceState.DEGRADED, problem
        self._publish(EngineStatus(state, desired.active_links, error, core.active_state))

    async def _admit(self, nft: NftState | None) -> str:
        """Let the host firewalls admit what lan links divert (host links re-enter via lo, which
        firewalls accept). Returns the first problem one reports, for LastError."""
        mark = self.config.tproxy.mark if nft is None else nft.settings.mark
        lan_links = frozenset() if nft is None else frozenset(nft.lan_links)
        problems = [p for p in [await fw.admit(mark, lan_links) for fw in self._firewalls] if p]
        return problems[0] if problems else ""  # _publish logs it with the state

    def _log_too_wide(self, facts: Facts) -> None:
        """Say (once per change) which connected prefixes are too wide to bypass."""
        bypass = self.config.bypass
        too_wide = too_wide_subnets(facts, bypass) if bypass.local_subnets else ()
        if too_wide and too_wide != self._too_wide:
            log.warning(
                "not bypassing connected prefixes wider than /%d (IPv4) or /%d (IPv6): %s "
                "([bypass] local_min_prefix4/6); traffic to them is proxied",
                bypass.local_min_prefix4,
                bypass.local_min_prefix6,
                ", ".join(too_wide),
            )
        self._too_wide = too_wide

    async def _drive_core(self, wanted: bool) -> CoreStatus:
        """Start/stop the core with the want; without a supervisor the core counts as ready."""
        if self._core is None:
            return CoreStatus(active_state="unsupervised", ready=True)
        await self._core.want(wanted)
        status = self._core.status
        self._core_was_ready = wanted and (self._core_was_ready or status.ready)
        return status

    async def _apply(self, prev: _Applied, desired: DesiredState, nft_drift: bool, routing_drift: bool) -> None:
        if desired.nft is None:
            if prev.nft is not None or not prev.known or nft_drift:
                await self._nft.delete()
            stale = prev.routing if prev.known else build_routing(self.config.tproxy)
            if stale.rules or stale.routes:
                await self._routing.remove(stale)
            return
        if prev.routing != desired.routing or not prev.known or routing_drift:
            await self._routing.ensure(desired.routing)
            await self._routing.remove(_minus(prev.routing, desired.routing))
        if prev.nft is None or nft_drift:
            changes = None
        elif prev.nft.bypass == desired.nft.bypass:
            changes = element_changes(prev.nft, desired.nft)
        else:  # a changed bypass list: a walk over 100k entries each, off the event loop
            changes = await asyncio.to_thread(element_changes, prev.nft, desired.nft)
        if changes is None:
            await self._nft.replace(desired.nft)
        elif changes:
            try:
                await self._nft.update_elements(changes)
            except KernelError as e:  # the kernel disagrees with what we think we applied: rebuild
                log.warning("element update failed (%s); replacing the table", e)
                await self._nft.replace(desired.nft)

    async def _rollback(self, prev: _Applied, desired: DesiredState) -> None:
        try:
            if prev.nft is not None:
                await self._nft.replace(prev.nft)
            else:
                await self._nft.delete()
            await self._routing.remove(_minus(desired.routing, prev.routing))
            if prev.routing.rules or prev.routing.routes:
                await self._routing.ensure(prev.routing)
        except KernelError as e:
            log.error("rollback failed too: %s; the next pass rebuilds everything", e)
            self._applied = _Applied()
            self._nft_drift = self._routing_drift = True

    def _publish(self, status: EngineStatus) -> None:
        changed = status != self.status
        self.status = status
        if changed:
            log.info(
                "state %s%s%s",
                status.state,
                f", active on {', '.join(status.active_links)}" if status.active_links else "",
                f": {status.last_error}" if status.last_error else "",
            )
            for listener in self._listeners:
                listener(status)

    # --- shutdown -------------------------------------------------------------------------------

    async def stop(self, remove: bool = True) -> None:
        """Stop the loop; with `remove`, take our table, rules and routes out of the kernel."""
        await self._passes.stop()
        if remove:
            await self._admit(None)
            await self._nft.delete()
            # What we applied, and what the current config would apply (a crashed run's leftovers).
            await self._routing.remove(_union(self._applied.routing, build_routing(self.config.tproxy)))
            self._applied = _Applied(known=True)
