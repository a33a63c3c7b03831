"""firewalld adapter: keeps (or removes) the rule of rules/firewalld.py in firewalld's input
chain. Talks to the kernel only (libnftables, on the nft adapter's worker thread): the rule lives
in firewalld's runtime ruleset, never in its configuration."""

from __future__ import annotations

import logging

from ..errors import KernelError
from ..rules import firewalld as rules
from .nft import NftablesAdapter

log = logging.getLogger(__name__)


class FirewalldAdmission:
    def __init__(self, nft: NftablesAdapter) -> None:
        self._nft = nft
        self._admitted: int | None = None

    async def admit(self, mark: int | None) -> str | None:
        """Make firewalld's input chain admit packets carrying `mark` (None: take our rule out).
        Returns why it cannot, or None (also when firewalld is not running)."""
        if not await self._nft.table_exists(rules.TABLE):
            self._admitted = None
            return None
        try:
            listing = await self._nft.listing(rules.build_list(), f"listing firewalld's {rules.INPUT_CHAIN}")
        except KernelError:
            return (
                f"firewalld's table inet {rules.TABLE} has no {rules.INPUT_CHAIN} chain, so its input filter "
                "would reject diverted lan traffic; tproxyd needs firewalld >= 0.6 with its nftables backend "
                "(FirewallBackend=nftables in /etc/firewalld/firewalld.conf)"
            )
        batch = rules.build_sync(listing, mark)
        if batch is not None:
            try:
                await self._nft.run(batch, f"updating firewalld's {rules.INPUT_CHAIN}")
            except KernelError as e:  # firewalld rebuilt its table meanwhile: its event brings us back
                return str(e)
        if mark != self._admitted:
            log.info(
                "firewalld: %s",
                f"admitting diverted packets (mark {mark}) in its input chain"
                if mark is not None
                else "removed our rule from its input chain",
            )
        self._admitted = mark
        return None
