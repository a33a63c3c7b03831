"""Host firewall adapter: keeps (or removes) the rule of rules/admission.py in firewalld's and
ufw's input chains, wherever they exist. Talks to the kernel only (libnftables, on the nft
adapter's worker thread): the rule lives in their runtime rulesets, never in their files."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import KernelError
from ..rules import admission as rules
from .nft import NftablesAdapter

log = logging.getLogger(__name__)


class FirewallAdmission:
    def __init__(self, nft: NftablesAdapter) -> None:
        self._nft = nft
        self._admitted: dict[rules.FirewallChain, int | None] = {}

    async def _chain(self, c: rules.FirewallChain) -> dict[str, object] | None:
        """The chain's listing (with handles), or None when there is no such chain."""
        if not await self._nft.table_exists(c.table, c.family):
            return None
        try:
            return await self._nft.listing(rules.build_list(c), f"listing {c.owner}'s {c.chain}")
        except KernelError:
            return None

    async def admit(self, mark: int, lan_links: frozenset[str]) -> str | None:
        """While lan links are proxied, make every host firewall's input chain admit packets
        carrying `mark` (no lan links: take our rules out). Returns why one cannot, or why
        Docker's FORWARD policy drops what the lan links send direct; None if all is well."""
        problems = [
            await self._input(mark if lan_links else None),
            *(_bridge_netfilter(link) for link in sorted(lan_links)),
            await self._docker_forward(lan_links),
        ]
        return "; ".join(p for p in problems if p) or None

    async def _docker_forward(self, lan_links: frozenset[str]) -> str | None:
        if not lan_links:
            return None
        docker_user = await self._chain(rules.DOCKER_USER)
        if docker_user is None:  # no Docker
            return None
        forward = await self._chain(rules.DOCKER_FORWARD)
        if forward is None or rules.chain_policy(forward) != "drop":
            return None
        blocked = sorted(link for link in lan_links if not rules.forward_allowed((docker_user, forward), link))
        if not blocked:
            return None
        return rules.docker_forward_problem(blocked)

    async def _input(self, mark: int | None) -> str | None:
        problem = None
        for c in rules.INPUT_CHAINS:
            listing = await self._chain(c)
            if listing is None:
                if (
                    c is rules.FIREWALLD
                    and mark is not None
                    and await self._chain(rules.FIREWALLD_IPTABLES) is not None
                ):
                    problem = rules.FIREWALLD_IPTABLES_PROBLEM
                self._admitted.pop(c, None)
                continue
            batch = rules.build_sync(c, listing, mark)
            if batch is not None:
                try:
                    await self._nft.run(batch, f"updating {c.owner}'s {c.chain}")
                except KernelError as e:  # rebuilt meanwhile: its change event brings us back
                    problem = problem or str(e)
                    continue
            if self._admitted.get(c) != mark:
                log.info(
                    "%s: %s",
                    c.owner,
                    f"admitting diverted packets (mark {mark}) in {c.family} {c.table} {c.chain}"
                    if mark is not None
                    else f"removed our rule from {c.family} {c.table} {c.chain}",
                )
            self._admitted[c] = mark
        return problem


def _bridge_netfilter(link: str) -> str | None:
    """A problem when `link` is a bridge whose packets br_netfilter hands to the inet hooks."""
    if not Path("/sys/class/net", link, "bridge").is_dir():
        return None
    sysctls = []
    for family in ("iptables", "ip6tables"):
        try:
            if Path(f"/proc/sys/net/bridge/bridge-nf-call-{family}").read_text().strip() == "1":
                sysctls.append(f"net.bridge.bridge-nf-call-{family}")
        except OSError:  # no br_netfilter
            pass
    return rules.bridge_netfilter_problem(link, sysctls) if sysctls else None
