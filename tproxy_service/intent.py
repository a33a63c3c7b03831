"""PURE: what the user wants, as one value: the config (its `[links]` are the defaults), the saved
choices over them, the NetworkManager facts the auto mode and the policies follow, and the policy
holds DisableLink switched off. `Control` alone writes it and hands it to the engine in one call;
the engine reads the links to proxy from it (docs/architecture.md, "The reconcile inputs")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from .model import Config, LinkChoice, LinkMode, NmFacts
from .nm_policy import PolicyHold, effective_links, policy_holds
from .state_store import Choices


@dataclass(frozen=True)
class Intent:
    """Frozen, so what is derived from it is computed once (cached_property; read-only results)."""

    config: Config = field(default_factory=Config)
    choices: Choices = field(default_factory=Choices)
    nm: NmFacts = field(default_factory=NmFacts)
    # (ifname, connection uuid): a policy hold switched off until that connection leaves the link.
    suppressed: frozenset[tuple[str, str]] = frozenset()

    @property
    def enabled(self) -> bool:
        return self.choices.enabled is not False

    @cached_property
    def link_choices(self) -> dict[str, LinkChoice]:
        """ifname -> host | lan | both | auto: the config's defaults under the saved choices (the
        D-Bus Links property)."""
        merged = {name: LinkChoice.of(mode) for name, mode in self.config.link_defaults.items()}
        for name, choice in self.choices.links.items():
            if choice is LinkChoice.DISABLED:
                merged.pop(name, None)
            else:
                merged[name] = choice
        return dict(sorted(merged.items()))

    @cached_property
    def manual_modes(self) -> dict[str, LinkMode | None]:
        """The manual choices as modes; None is auto."""
        return {name: choice.mode for name, choice in self.link_choices.items()}

    @cached_property
    def proxied_links(self) -> dict[str, LinkMode]:
        """Every link to proxy, with its mode: the manual choices (auto resolved) and the links a
        [[networkmanager.auto]] policy holds."""
        return effective_links(self.manual_modes, self.config.networkmanager, self.nm, self.suppressed)

    @cached_property
    def policy_holds(self) -> dict[str, PolicyHold]:
        """Links proxied by a [[networkmanager.auto]] policy right now (manual choices aside)."""
        manual = self.link_choices
        holds = policy_holds(self.config.networkmanager, self.nm, self.suppressed)
        return {name: hold for name, hold in holds.items() if name not in manual}


def log_lines(before: Mapping[str, PolicyHold], after: Mapping[str, PolicyHold]) -> list[str]:
    """Why a link starts or stops being proxied without anyone asking for it (for the log)."""
    lines = [
        f"{name}: released (connection {before[name].connection.id!r} left it)"
        for name in sorted(before.keys() - after.keys())
    ]
    for name, hold in sorted(after.items()):
        prev = before.get(name)
        if prev is None or (prev.mode, prev.connection.uuid) != (hold.mode, hold.connection.uuid):
            lines.append(
                f"{name}: proxied as {hold.mode} while connection {hold.connection.id!r} is on it "
                f"(networkmanager.auto[{hold.entry}])"
            )
    return lines
