"""Link toggle and local-subnet update: our netlink element writer vs a libnftables command.

In a fresh namespace per bypass size (0, 10k, 100k user CIDRs + 2k IPv6 when non-zero, plus the
reserved ranges), the table is loaded with `NftablesAdapter.replace`, then:
  * link toggle: add, then remove, the ifname "tpbx0" in set `lan_links`;
  * local-subnet update: add, then remove, the interval 198.51.100.0/24 in set `local4`.
Each add and each remove is one sample (one nf_tables transaction):
  * ours: `SetElementWriter.apply([change])`, called directly (synchronously);
  * baseline: `nftables.Nftables().cmd('add element inet tproxyd lan_links { "tpbx0" }')` (and
    `delete element ...`), in-process, so no fork/exec is counted for it either.
The kernel is checked to hold (and then not hold) the element after our writes.

Raw samples: bench/results/toggle.json; bench/render.py makes the tables.
Run as root: .venv/bin/python bench/toggle.py [--repeat 200] [--lib-repeat 50] [--lib-repeat-large 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchlib import (
    Report,
    bench_main,
    bench_parser,
    bench_state,
    bypass_lines,
    log,
    netns,
    run_worker,
    save_results,
)

LARGE = 100_000
IFNAME = "tpbx0"
SUBNET = "198.51.100.0/24"
KINDS = ("link toggle (lan_links)", "local-subnet update (local4)")
PATHS = ("ours", "libnftables")
OPS = ("add", "remove")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return bench_parser(
        __doc__,
        ("--repeat", 200, "add+remove cycles, ours"),
        ("--lib-repeat", 50, "add+remove cycles, libnftables, below 100k"),
        ("--lib-repeat-large", 20, "add+remove cycles, libnftables, at 100k"),
        ("--sizes", "0,10000,100000", "bypass IPv4 counts"),
    ).parse_args(argv)


# --- worker (inside the namespace) --------------------------------------------------------------


def cycle_ms(add: Callable[[], None], remove: Callable[[], None], cycles: int) -> dict[str, list[float]]:
    """Alternate add and remove `cycles` times; milliseconds per operation."""
    samples: dict[str, list[float]] = {"add": [], "remove": []}
    for _ in range(cycles):
        for op, func in (("add", add), ("remove", remove)):
            start = time.perf_counter()
            func()
            samples[op].append((time.perf_counter() - start) * 1000)
    return samples


def worker(params: dict[str, Any]) -> dict[str, Any]:
    import nftables

    from tproxy_service.cidrs import parse_cidr, parse_cidr_lines
    from tproxy_service.kernel.nft import NftablesAdapter
    from tproxy_service.kernel.nft_netlink import SetElementWriter
    from tproxy_service.rules.nft import SET_LAN_LINKS, SET_LOCAL4, TABLE, IfnameChange, IntervalChange

    size = int(params["size"])
    user = parse_cidr_lines(bypass_lines(size, 2000 if size else 0), "generated")
    state = bench_state(user)
    adapter = NftablesAdapter()
    asyncio.run(adapter.replace(state))
    adapter.close()

    writer = SetElementWriter(TABLE)
    _family, interval = parse_cidr(SUBNET)

    def ops(apply: Callable[[list[Any]], None]) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
        return {
            KINDS[0]: (
                lambda: apply([IfnameChange(SET_LAN_LINKS, (IFNAME,), ())]),
                lambda: apply([IfnameChange(SET_LAN_LINKS, (), (IFNAME,))]),
            ),
            KINDS[1]: (
                lambda: apply([IntervalChange(SET_LOCAL4, 4, (interval,), ())]),
                lambda: apply([IntervalChange(SET_LOCAL4, 4, (), (interval,))]),
            ),
        }

    ours = ops(writer.apply)
    nft = nftables.Nftables()

    def command(text: str) -> Callable[[], None]:
        def run() -> None:
            rc, _out, error = nft.cmd(text)
            assert rc == 0, f"{text}: {error}"

        return run

    lib = {
        KINDS[0]: (
            command(f'add element inet {TABLE} {SET_LAN_LINKS} {{ "{IFNAME}" }}'),
            command(f'delete element inet {TABLE} {SET_LAN_LINKS} {{ "{IFNAME}" }}'),
        ),
        KINDS[1]: (
            command(f"add element inet {TABLE} {SET_LOCAL4} {{ {SUBNET} }}"),
            command(f"delete element inet {TABLE} {SET_LOCAL4} {{ {SUBNET} }}"),
        ),
    }
    checks = {KINDS[0]: (SET_LAN_LINKS, f'"{IFNAME}"'), KINDS[1]: (SET_LOCAL4, SUBNET)}

    def holds(kind: str) -> bool:
        set_name, needle = checks[kind]
        rc, out, error = nft.cmd(f"list set inet {TABLE} {set_name}")
        assert rc == 0, error
        return needle in out

    lib_cycles = int(params["lib_large"] if size >= LARGE else params["lib"])
    result: dict[str, Any] = {
        "size": size,
        "elements4": len(state.bypass.v4),
        "elements6": len(state.bypass.v6),
    }
    verified = True
    for kind in KINDS:
        add, remove = ours[kind]
        add()  # warm-up, and the proof that our writes land in the kernel
        verified &= holds(kind)
        remove()
        verified &= not holds(kind)
        result[f"ours/{kind}"] = cycle_ms(add, remove, int(params["repeat"]))
        log(f"toggle {size}: {kind}: ours done")
        result[f"libnftables/{kind}"] = cycle_ms(*lib[kind], lib_cycles)
        log(f"toggle {size}: {kind}: libnftables done")
    if hasattr(writer, "close"):
        writer.close()
    result["verified"] = verified
    return result


# --- parent -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        log(f"toggle: {size} bypass CIDRs loaded")
        params = {
            "size": size,
            "repeat": args.repeat,
            "lib": args.lib_repeat,
            "lib_large": args.lib_repeat_large,
        }
        with netns(f"toggle{size}") as ns:
            results.append(run_worker(ns, __file__, params))
    return save_results("toggle", {"results": results})


def main(argv: Sequence[str]) -> int:
    return bench_main(argv, parse_args, run, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
