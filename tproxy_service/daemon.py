"""tproxyd: the composition root. Wires config, kernel adapters, monitors and the engine;
handles signals: SIGTERM/SIGINT remove everything of ours (with failure_policy closed, keep the
diversion as a kill switch) and exit 0, abandoning a reload in progress; SIGHUP reloads exactly
as D-Bus Reload does (a bad config is refused and the running state kept)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import threading
from pathlib import Path

from . import __version__, heap
from .bounded_read import Cancelled
from .bus import service as bus_service
from .config import DEFAULT_PATH, load_config
from .control import Control
from .desired import bypass_set
from .engine import Engine, EngineStatus
from .errors import ConfigError, TproxydError
from .kernel.admission import FirewallAdmission
from .kernel.facts import FactsReader
from .kernel.nft import NftablesAdapter
from .kernel.routing import RoutingAdapter
from .list_child import parse_in_child
from .logsetup import sd_notify, setup_logging
from .model import Config, FailurePolicy, NmFacts
from .monitors.netlink import NetlinkMonitor
from .monitors.networkmanager import NetworkManagerMonitor
from .monitors.nft_events import NftDriftWatch
from .proxycore.supervisor import CoreSupervisor
from .proxycore.systemd import SystemdUnit
from .rules.admission import INPUT_CHAINS
from .rules.nft import TABLE
from .rules.routing import build_routing
from .state_store import StateStore

log = logging.getLogger("tproxyd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tproxyd",
        description=(
            "Transparent-proxy service: diverts the traffic of the links named in the config "
            "(nftables TPROXY + policy routing, IPv4/IPv6, TCP/UDP) to the proxy core's port, "
            "follows links and addresses as they change, and heals its table, rules and routes if "
            "someone deletes them. Runs in the foreground; SIGTERM removes everything it added "
            "(with failure_policy = closed it keeps blocking the proxied links until `tproxyctl off`, "
            "DisableLink or `make uninstall`; a reload in progress is abandoned), SIGHUP reloads the "
            "config exactly like D-Bus Reload. Files are read only if regular and within their limits "
            "(config 1 MiB; each bypass list [bypass] max_file_bytes, default 64 MiB, and "
            "max_file_lines, default 1,000,000)."
        ),
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"config file (TOML; default {DEFAULT_PATH})")
    parser.add_argument(
        "--check", action="store_true", help="validate the config (and CIDR files, within their limits), then exit"
    )
    parser.add_argument(
        "--release",
        action="store_true",
        help="remove the table, policy rules and routes a stopped tproxyd kept (failure_policy = closed "
        "keeps blocking the proxied links after a stop), then exit; `make uninstall` runs it",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    parser.add_argument("--version", action="version", version=f"tproxyd {__version__}")
    return parser.parse_args(argv)


class Daemon:
    def __init__(self, config: Config) -> None:
        # firewalld and ufw rebuild their chains on reload and restart, dropping our rule: put it
        # back then (and when one starts after us).
        neighbours = {
            (c.family, c.table): lambda reason, owner=c.owner: self._request(f"{owner}'s rules changed ({reason})")
            for c in INPUT_CHAINS
        }
        self.nft_watch = NftDriftWatch(TABLE, self._nft_drift, neighbours)
        self.nft = NftablesAdapter(watch=self.nft_watch, on_missing=self._nft_drift)
        self.routing = RoutingAdapter()
        self.facts = FactsReader()
        # [core] supervise = false: an external core the admin runs; tproxyd diverts unconditionally.
        self.core: CoreSupervisor | None = None
        if config.core.supervise:
            core = config.core
            self.core = CoreSupervisor(
                config,
                lambda listener: SystemdUnit(core.systemd_bus, core.unit, listener),
                lambda reason: self._request(reason),
            )
        firewalls = FirewallAdmission(self.nft)
        self.engine = Engine(config, self.nft, self.routing, self.facts, self.core, firewalls=(firewalls,))
        self.monitor = NetlinkMonitor(
            mark=lambda: self.engine.config.tproxy.mark,
            table=lambda: self.engine.config.tproxy.route_table,
            on_change=lambda reason: self._request(reason),
            on_routing_drift=lambda reason: self._request(reason, routing_drift=True),
        )
        # NetworkManager's facts (auto mode, [[networkmanager.auto]] policies); optional: without
        # NetworkManager (or with [networkmanager] enabled = false) links follow netlink alone.
        self.nm: NetworkManagerMonitor | None = None
        self._stop = asyncio.Event()
        self._cancel_reads = threading.Event()
        # D-Bus choices (persisted) over the config's [links] defaults; the bus is optional.
        self.control = Control(
            self.engine,
            StateStore(config.state_dir),
            self._read_config,
            self._apply_config,
            self._refresh_nm,
            self._warnings,
        )
        self.bus: bus_service.BusService | None = None
        self.engine.add_listener(self._notify_status)

    def _warnings(self) -> tuple[str, ...]:
        return self.core.warnings if self.core is not None else ()

    @staticmethod
    def _notify_status(status: EngineStatus) -> None:
        sd_notify(f"STATUS=state {status.state}, active on {', '.join(status.active_links) or 'none'}")

    def _request(self, reason: str, routing_drift: bool = False) -> None:
        self.engine.request(reason, routing_drift=routing_drift)

    def _nft_drift(self, reason: str) -> None:
        log.warning("our nftables table was changed from outside (%s); restoring it", reason)
        self.engine.request(reason, nft_drift=True)

    async def _follow_nm(self, enabled: bool) -> None:
        """Start or stop following NetworkManager ([networkmanager] enabled)."""
        if enabled and self.nm is None:
            bus = self.bus.connection if self.bus is not None else None
            if bus is None:  # (the D-Bus service has already said why); followed once the bus is there
                log.info("not following NetworkManager without the system bus; links follow netlink only")
                return
            self.nm = NetworkManagerMonitor(self.control.set_network, lambda reason: self.engine.reapply(reason), bus)
            await self.nm.start()
        elif not enabled and self.nm is not None:
            await self.nm.stop()
            self.nm = None
            log.info("not following NetworkManager ([networkmanager] enabled = false)")
            self.control.set_network(NmFacts(), "stopped following NetworkManager")

    async def _bus_back(self) -> None:
        """The system bus came (back): NetworkManager is followed on the service's connection,
        which the same event ended, so follow it anew on the new one."""
        if self.nm is not None:
            await self.nm.stop()
            self.nm = None
        await self._follow_nm(self.engine.config.networkmanager.enabled)

    async def _refresh_nm(self) -> None:
        if self.nm is not None:
            await self.nm.refresh()

    async def _read_config(self) -> Config:
        """Re-read the config and its list files in a thread (bounded; abandoned on SIGTERM)."""
        path = self.engine.config.path
        assert path is not None
        log.info("reloading the config from %s", path)
        return await asyncio.to_thread(_load_and_merge, path, self._cancel_reads)

    async def _apply_config(self, config: Config) -> int:
        """Put a read config in place; raises ConfigError (running state kept) when the core
        refuses it. Returns the engine ticket of the pass that applies it."""
        if self.core is not None:
            await self.core.reload(config)  # ConfigError here: the running core is untouched
        await self._follow_nm(config.networkmanager.enabled)
        ticket = self.control.use_config(config)
        gc.freeze()  # see run()
        log.info("config from %s in place", config.path)
        return ticket

    async def _reload_on_sighup(self) -> None:
        """SIGHUP is D-Bus Reload without the caller: the same lock, the same rollback."""
        try:
            await self.control.reload()
        except Cancelled:
            pass
        except ConfigError as e:
            log.error("config error, keeping the running configuration: %s", e)
        except TproxydError as e:  # the kernel refused it: rolled back
            log.error("reload failed: %s", e)

    def _on_sigterm(self) -> None:
        self._cancel_reads.set()  # a reload reading a huge list gives up at once
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._on_sigterm)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_on_sighup()))
        self.control.restore()
        if self.engine.config.tproxy.failure_policy is FailurePolicy.CLOSED:
            await self.engine.arm()  # not one packet direct while the slow steps below run
        # A core config the core would refuse stops us here (under closed: still blocking).
        if self.core is not None:
            await self.core.prepare(self.engine.config)
        # Own the name before touching the kernel: a second tproxyd stops here (AlreadyRunning).
        self.bus = await bus_service.start(self.control, self._bus_back)
        # Subscribe before the first read so no change between the two is missed.
        await self.monitor.start()
        # Before the first pass, so a restart keeps the links NetworkManager's policies hold.
        await self._follow_nm(self.engine.config.networkmanager.enabled)
        self.nft_watch.start()
        self.engine.start()
        status = await self.engine.reconcile("startup")
        links = ", ".join(status.active_links) or "none"
        if self.bus:
            self.bus.ready()
        # The config (up to 100k+ bypass intervals) lives as long as we do: keep the cyclic GC from
        # rescanning it, which otherwise costs a D-Bus toggle tens of ms now and then.
        gc.freeze()
        log.info("tproxyd ready: state=%s active=%s", status.state, links)
        sd_notify(f"READY=1\nSTATUS=state {status.state}, active on {links}")
        await self._stop.wait()
        # failure_policy closed: a kill switch. The table, rules and routes stay, so the proxied
        # links stay blocked (the core stops with us) until `tproxyctl off`, DisableLink or
        # `make uninstall` releases them; the next start takes them over (see NftablesAdapter).
        keep = self.engine.config.tproxy.failure_policy is FailurePolicy.CLOSED and self.engine.diverting
        if keep:
            log.info(
                "stopping: failure_policy closed keeps table inet %s, rules and routes (links stay blocked)", TABLE
            )
        else:
            log.info("stopping: removing table inet %s, policy rules and routes", TABLE)
        sd_notify("STOPPING=1")
        if self.bus:
            self.bus.close()
        await self.monitor.stop()
        if self.nm is not None:
            await self.nm.stop()
        self.nft_watch.pause()
        await self.engine.stop(remove=not keep)
        if self.core is not None:
            await self.core.want(False)  # nothing is diverted any more: the core is not needed
            await self.core.settle()
            await self.core.close()
            self.core.unit.close()
        self.nft.close()
        self.routing.close()
        self.facts.close()


async def release(config: Config) -> None:
    """What SIGTERM does under failure_policy open, for a tproxyd that is not running."""
    nft, routing = NftablesAdapter(), RoutingAdapter()
    try:
        await nft.delete()
        await routing.remove(build_routing(config.tproxy))
    finally:
        nft.close()
        routing.close()


def _load_and_merge(path: Path, cancel: threading.Event) -> Config:
    """Off the event loop: parse the config and lists (a changed list in a child process, see
    list_child.py), and merge the bypass set the engine will ask for (cidrs.union returns this
    result again for the same inputs)."""
    config = load_config(path, cancel, parse_in_child, cache_lists=True)
    bypass_set(config)
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    heap.keep_large_blocks_mapped()
    try:
        config = load_config(args.config, cache_lists=not (args.check or args.release))
    except ConfigError as e:
        print(f"tproxyd: config error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK ({len(config.link_defaults)} links configured)")
        return 0
    if args.release:
        asyncio.run(release(config))
        print(f"tproxyd: released (no table inet {TABLE}, policy rules or routes of ours left)")
        return 0
    try:
        asyncio.run(Daemon(config).run())
    except ConfigError as e:
        print(f"tproxyd: config error: {e}", file=sys.stderr)
        return 2
    except bus_service.AlreadyRunning as e:
        print(f"tproxyd: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"tproxyd: permission denied ({e}); run as root or with CAP_NET_ADMIN", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
