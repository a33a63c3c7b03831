"""Host firewall adapter: keeps (or removes) the rule of rules/admission.py in firewalld's and
ufw's input chains, wherever they exist. Talks to the kernel only (libnftables, on the nft
adapter's worker thread): the rule lives in their runtime rulesets, never in their files."""

from __future__ import annotations

import logging

from ..errors import KernelError
from ..rules import admission as rules
from .nft import NftablesAdapter

log = logging.getLogger(__name__)

# firewalld's iptables backend (FirewallBackend=iptables) builds this chain instead of its table.
_FIREWALLD_IPTABLES = rules.InputChain("firewalld", "ip", "filter", "INPUT_ZONES")
_FIREWALLD_CONF = "/etc/firewalld/firewalld.conf"


class FirewallAdmission:
    def __init__(self, nft: NftablesAdapter) -> None:
        self._nft = nft
        self._admitted: dict[rules.InputChain, int | None] = {}

    async def _chain(self, c: rules.InputChain) -> dict[str, object] | None:
        """The chain's listing (with handles), or None when there is no such chain."""
        if not await self._nft.table_exists(c.table, c.family):
            return None
        try:
            return await self._nft.listing(rules.build_list(c), f"listing {c.owner}'s {c.chain}")
        except KernelError:
            return None

    async def admit(self, mark: int | None) -> str | None:
        """Make every host firewall's input chain admit packets carrying `mark` (None: take our
        rules out). Returns why one cannot, or None (also when there is no firewall)."""
        problem = None
        for c in rules.INPUT_CHAINS:
            listing = await self._chain(c)
            if listing is None:
                if c is rules.FIREWALLD and mark is not None and await self._chain(_FIREWALLD_IPTABLES) is not None:
                    problem = (
                        "firewalld runs its iptables backend, whose input chain rejects diverted lan traffic; "
                        f"switch it to nftables: sed -i 's/^FirewallBackend=.*/FirewallBackend=nftables/' "
                        f"{_FIREWALLD_CONF} && systemctl restart firewalld"
                    )
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
