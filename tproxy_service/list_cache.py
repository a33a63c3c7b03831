"""Parsed CIDR lists kept across restarts, under `state_dir/lists/`, by their content's SHA-256.

Parsing a 100k-line list is ~90 ms of the ~0.5 s a start takes (most of the rest is the
interpreter and the kernel loading the sets). A boot or restart with an unchanged list reads its
packed intervals back instead: the file is still read and hashed, and its line limit checked, so
only the parse is skipped. Each entry carries a checksum of itself, so a torn or damaged entry is
parsed anew (and rewritten); entries of lists no longer named are removed. The directory is
root's, as state.json is: whoever can write there can as well edit the config."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

from .atomic_file import write_atomic
from .bounded_read import read_bytes
from .errors import ConfigError
from .model import AddressSet

log = logging.getLogger(__name__)

# Entries are keyed by the list's content alone: bump the version whenever the same content would
# parse to something else (a change of what a line means, of the packed format).
_MAGIC = b"tproxyd-list-1\n\0"
_SUM = 32  # SHA-256 of everything before it
_MAX_ENTRY_BYTES = 256 << 20  # an entry is smaller than its list (8 B per IPv4 line at most)


class ListCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.used: set[str] = set()

    def keep(self, digest: bytes) -> None:
        """The list hashing to `digest` is named by the config: prune() leaves its entry."""
        self.used.add(digest.hex())

    def _entry(self, digest: bytes) -> Path:
        return self.directory / f"{digest.hex()}.bin"

    def get(self, digest: bytes) -> AddressSet | None:
        """The parsed list whose content hashes to `digest`, or None (absent or not intact)."""
        path = self._entry(digest)
        try:
            data = read_bytes(path, _MAX_ENTRY_BYTES, "list cache entry", "the cache's own limit")
        except ConfigError:  # absent, or not a regular file: parse instead
            return None
        body, checksum = data[:-_SUM], data[-_SUM:]
        if len(data) < _SUM or not body.startswith(_MAGIC) or hashlib.sha256(body).digest() != checksum:
            log.warning("list cache entry %s is not intact; parsing the list again", path)
            return None
        try:
            return AddressSet.from_bytes(body[len(_MAGIC) :])
        except ValueError:
            log.warning("list cache entry %s is malformed; parsing the list again", path)
            return None

    def put(self, digest: bytes, addresses: AddressSet) -> None:
        """Keep `addresses` for the content hashing to `digest`; a failure only costs a parse."""
        body = _MAGIC + addresses.to_bytes()
        try:  # not durable: a torn entry fails its checksum and is parsed anew
            write_atomic(self._entry(digest), body + hashlib.sha256(body).digest(), 0o600, durable=False)
        except OSError as e:
            log.warning("cannot keep the parsed list in %s: %s", self.directory, e)

    def prune(self) -> None:
        """Remove the entries of lists this config no longer names (and stray temp files)."""
        with contextlib.suppress(OSError):
            for entry in self.directory.iterdir():
                if entry.name.removesuffix(".bin") not in self.used:
                    with contextlib.suppress(OSError):
                        entry.unlink()
