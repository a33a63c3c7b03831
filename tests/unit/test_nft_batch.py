"""The compact element encoding kept for the bypass sets, and the JSON -> netlink translation's
refusals (what it turns into kernel objects is checked against `nft` in the kernel tier)."""

from __future__ import annotations

import struct

import pytest

from tproxy_service.cidrs import parse_cidrs
from tproxy_service.kernel import nft_batch
from tproxy_service.kernel.netlink_wire import parse_attrs
from tproxy_service.model import Interval
from tproxy_service.rules.nft import FAMILY, TABLE, build_replace

from .scenarios import SCENARIOS


def _keys(chunks: tuple[bytes, ...]) -> list[tuple[str, bool]]:
    """(address bytes as hex, interval end?) of every element, in order."""
    out = []
    for chunk in chunks:
        offset = 0
        while offset < len(chunk):
            length = struct.unpack_from("=H", chunk, offset)[0]
            attrs = parse_attrs(chunk, offset + 4, offset + length)
            key = parse_attrs(attrs[nft_batch.NFTA_SET_ELEM_KEY], 0, len(attrs[nft_batch.NFTA_SET_ELEM_KEY]))[1]
            flags = attrs.get(nft_batch.NFTA_SET_ELEM_FLAGS)
            out.append((key.hex(), flags == struct.pack("!I", nft_batch.NFT_SET_ELEM_INTERVAL_END)))
            offset += length
    return out


def test_intervals_pack_as_nft_stores_them() -> None:
    v4 = parse_cidrs(["10.0.0.0/8", "192.0.2.7", "255.255.255.0/24"], "t").v4
    assert _keys(nft_batch.encode_interval_set(4, v4)) == [
        ("00000000", True),  # nothing below 10.0.0.0
        ("0a000000", False),
        ("0b000000", True),
        ("c0000207", False),
        ("c0000208", True),
        ("ffffff00", False),  # reaches the top: no end element
    ]
    assert _keys(nft_batch.encode_interval_set(4, parse_cidrs(["0.0.0.0/1"], "t").v4)) == [
        ("00000000", False),
        ("80000000", True),
    ]


def test_packed_elements_are_compact_and_chunked_for_netlink() -> None:
    intervals = [Interval(i * 4, i * 4 + 1) for i in range(1, 100_001)]
    chunks = nft_batch.encode_interval_set(4, intervals)
    assert all(len(c) <= nft_batch.MAX_ELEMENTS_BYTES for c in chunks)  # a nested attribute is 16-bit
    assert sum(map(len, chunks)) == 24 + 100_000 * (16 + 24)  # the leading end, then start + end each
    assert len(_keys(chunks)) == 1 + 200_000


def test_translation_refuses_what_it_does_not_know() -> None:
    commands = build_replace(SCENARIOS["default"])["nftables"]
    with pytest.raises(nft_batch.UnsupportedJson, match="pre-encoded"):  # elements never as JSON
        nft_batch.translate(commands, FAMILY, TABLE, {})
    with pytest.raises(nft_batch.UnsupportedJson, match="operator"):
        nft_batch.translate(
            [
                {
                    "add": {
                        "rule": {
                            "family": FAMILY,
                            "table": TABLE,
                            "chain": "c",
                            "expr": [{"match": {"op": "<", "left": {"meta": {"key": "mark"}}, "right": 1}}],
                        }
                    }
                }
            ],
            FAMILY,
            TABLE,
            {},
        )
