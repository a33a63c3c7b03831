"""Domain types shared by the pure builders, the engine and the adapters."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import and_, rshift
from pathlib import Path
from typing import overload

from . import ipv4_keys
from .errors import InvalidArgument


class LinkMode(enum.StrEnum):
    HOST = "host"  # this machine's own traffic leaving via the link
    LAN = "lan"  # traffic arriving on the link from other hosts (gateway/hotspot)
    BOTH = "both"

    @property
    def diverts_lan(self) -> bool:
        return self in (LinkMode.LAN, LinkMode.BOTH)

    @property
    def diverts_host(self) -> bool:
        return self in (LinkMode.HOST, LinkMode.BOTH)


class LinkChoice(enum.StrEnum):
    """What the user chose for one link. Its spellings: the config's `[links]` take host, lan and
    both; a `[[networkmanager.auto]]` mode also auto; state.json all five; D-Bus (EnableLink's mode,
    the Links property) spells auto "" and never carries disabled."""

    HOST = "host"
    LAN = "lan"
    BOTH = "both"
    AUTO = "auto"  # lan while the link's NetworkManager connection is shared (hotspot), else host
    DISABLED = "disabled"  # saved only: switches a `[links]` default off

    @property
    def mode(self) -> LinkMode | None:
        """The mode it proxies with; None for auto (resolved by nm_policy)."""
        assert self is not LinkChoice.DISABLED, "a disabled link is not proxied"
        return None if self is LinkChoice.AUTO else LinkMode(self.value)

    @staticmethod
    def of(mode: LinkMode | None) -> LinkChoice:
        return LinkChoice.AUTO if mode is None else LinkChoice(mode.value)

    @staticmethod
    def parse(text: str, allowed: tuple[LinkChoice, ...]) -> LinkChoice:
        """A config or state spelling; InvalidArgument names the allowed ones."""
        if text in allowed:
            return LinkChoice(text)
        raise InvalidArgument(f"no such mode {_shown(text)}: use {', '.join(repr(c.value) for c in allowed)}")

    @staticmethod
    def from_bus(text: str) -> LinkChoice:
        """EnableLink's mode argument."""
        if text == "":
            return LinkChoice.AUTO
        if text in FIXED_MODES:
            return LinkChoice(text)
        raise InvalidArgument(f"no such mode {_shown(text)}: use 'host', 'lan', 'both' or '' (auto)")

    def to_bus(self) -> str:
        return "" if self is LinkChoice.AUTO else self.value


FIXED_MODES = (LinkChoice.HOST, LinkChoice.LAN, LinkChoice.BOTH)  # [links] values; on D-Bus also "" (auto)
WITH_AUTO = (*FIXED_MODES, LinkChoice.AUTO)  # [[networkmanager.auto]] mode, tproxyctl enable --mode
STATE_CHOICES = tuple(LinkChoice)  # state.json


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


class FailurePolicy(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class DnsHijack(enum.StrEnum):
    """Which port-53 traffic goes to the core even where the destination would be bypassed."""

    OFF = "off"  # none: DNS is ordinary traffic
    LAN = "lan"  # DNS to directly connected subnets (the LAN's router as resolver)
    ALL = "all"  # that, and from lan links' clients DNS to any address, this gateway's own included


class ServiceState(enum.StrEnum):
    OFF = "off"
    STARTING = "starting"
    ACTIVE = "active"
    DEGRADED = "degraded"
    BLOCKED = "blocked"
    FAILED = "failed"


@dataclass(frozen=True, order=True)
class Interval:
    """An inclusive range of addresses of one family, as integers (first <= last)."""

    first: int
    last: int


class PackedIntervals(Sequence[Interval]):
    """Intervals kept as one bytes object of big-endian (first, last) pairs, `width` bytes each:
    8 B per IPv4 interval instead of ~250 B of objects (a 100k-entry bypass list is kept twice,
    as the config's and as the applied set). Compares as the sequence of its Intervals."""

    __slots__ = ("data", "width")

    def __init__(self, width: int, data: bytes = b"") -> None:
        self.width = width
        self.data = data

    @classmethod
    def pack(cls, width: int, intervals: Iterable[Interval]) -> PackedIntervals:
        if isinstance(intervals, PackedIntervals) and intervals.width == width:
            return intervals
        parts = []
        for iv in intervals:
            parts.append(iv.first.to_bytes(width, "big"))
            parts.append(iv.last.to_bytes(width, "big"))
        return cls(width, b"".join(parts))

    def __len__(self) -> int:
        return len(self.data) // (2 * self.width)

    @overload
    def __getitem__(self, index: int) -> Interval: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Interval, ...]: ...
    def __getitem__(self, index: int | slice) -> Interval | tuple[Interval, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("interval index out of range")
        w, start = self.width, 2 * self.width * index
        first, last = self.data[start : start + w], self.data[start + w : start + 2 * w]
        return Interval(int.from_bytes(first), int.from_bytes(last))

    def __iter__(self) -> Iterator[Interval]:
        for first, last in self.bounds():
            yield Interval(first, last)

    def bounds(self) -> Iterator[tuple[int, int]]:
        """(first, last) pairs, without making Interval objects."""
        w, data = self.width, self.data
        if w == 4:  # at C speed, and one key at a time: a 100k-entry set is walked on every replace
            keys = ipv4_keys.words(data)
            return zip(map(rshift, keys, repeat(32)), map(and_, keys, repeat(ipv4_keys.LOW)), strict=True)
        return self._wide_bounds()

    def _wide_bounds(self) -> Iterator[tuple[int, int]]:
        w, data = self.width, self.data
        for start in range(0, len(data), 2 * w):
            yield int.from_bytes(data[start : start + w]), int.from_bytes(data[start + w : start + 2 * w])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedIntervals):
            return self.data == other.data
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"PackedIntervals({list(self)!r})"


@dataclass(frozen=True)
class AddressSet:
    """Disjoint, non-adjacent, sorted intervals per family (see cidrs.merge), kept packed."""

    v4: Sequence[Interval] = ()
    v6: Sequence[Interval] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "v4", PackedIntervals.pack(4, self.v4))
        object.__setattr__(self, "v6", PackedIntervals.pack(16, self.v6))

    def to_bytes(self) -> bytes:
        """The IPv4 part's length (8 bytes, big-endian), the IPv4 part, the IPv6 part: how a parse
        travels from the child (list_child.py) and lies in the cache (list_cache.py)."""
        v4, v6 = PackedIntervals.pack(4, self.v4).data, PackedIntervals.pack(16, self.v6).data
        return len(v4).to_bytes(_LENGTH, "big") + v4 + v6

    @classmethod
    def from_bytes(cls, data: bytes) -> AddressSet:
        """The inverse of to_bytes; ValueError when `data` is not that."""
        split = _LENGTH + int.from_bytes(data[:_LENGTH], "big")
        v4, v6 = data[_LENGTH:split], data[split:]
        if len(data) < _LENGTH or split > len(data) or len(v4) % 8 or len(v6) % 32:
            raise ValueError("not a packed address set")
        return cls(PackedIntervals(4, v4), PackedIntervals(16, v6))


_LENGTH = 8


# Below 1024: while the core is down, no local user can bind it in the core's place (the core
# unit has CAP_NET_BIND_SERVICE). Unassigned by IANA.
DEFAULT_TPROXY_PORT = 1012
PRIVILEGED_PORTS_END = 1024  # net.ipv4.ip_unprivileged_port_start's default


@dataclass(frozen=True)
class TproxySettings:
    port: int = DEFAULT_TPROXY_PORT
    mark: int = 1
    core_mark: int = 255
    route_table: int = 100
    # Above Tailscale's 52xx rules, below wg-quick's 32764/32765 and main's 32766.
    rule_priority: int = 10100
    ipv6: bool = True
    udp: bool = True
    dns_hijack: DnsHijack = DnsHijack.ALL
    failure_policy: FailurePolicy = FailurePolicy.OPEN
    allow_unprivileged_port: bool = False  # a port >= 1024 only when the admin says so
    # The conntrack mark bit that remembers a bypassed connection (masked: other bits of ct mark
    # belong to whoever else uses them).
    bypass_ct_bit: int = 30


# Per [bypass] file: a full BGP table is ~1M prefixes; parsing 1M lines takes seconds.
DEFAULT_MAX_FILE_BYTES = 64 << 20
DEFAULT_MAX_FILE_LINES = 1_000_000


@dataclass(frozen=True)
class BypassSettings:
    reserved: bool = True
    local_subnets: bool = True
    # Connected prefixes wider than these are not bypassed (a hostile DHCP /1 would make half of
    # IPv4 direct); they are logged instead.
    local_min_prefix4: int = 16
    local_min_prefix6: int = 48
    cidrs: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_file_lines: int = DEFAULT_MAX_FILE_LINES


@dataclass(frozen=True)
class CoreSettings:
    """[core]: the proxy core tproxyd supervises through systemd."""

    supervise: bool = True  # false: an external core the admin runs; tproxyd treats it as always ready
    config: Path | None = None  # the user's v2ray JSON; None = built-in direct (freedom) outbound
    binary: Path = Path("/usr/bin/v2ray")  # xray takes the same flags
    unit: str = "tproxyd-core.service"
    systemd_bus: str = "system"  # "system", "user" or a D-Bus address
    sniffing: bool = True


@dataclass(frozen=True)
class CoreStatus:
    active_state: str = "inactive"  # the core unit's ActiveState; "unreachable" when systemd is not
    ready: bool = False  # listening with IP_TRANSPARENT on the tproxy port, every family
    detail: str = ""  # why it is not ready (becomes LastError while degraded/blocked)


@dataclass(frozen=True)
class AutoPolicy:
    """One `[[networkmanager.auto]]` entry: a connection matching every criterion given (at least
    one is) proxies the link it is active on with `mode` (None = auto: lan when shared, else host)."""

    mode: LinkMode | None
    id: str | None = None
    uuid: str | None = None  # lowercase
    type: str | None = None  # a device type name (nm_policy.DEVICE_TYPES)
    shared: bool | None = None


@dataclass(frozen=True)
class NetworkManagerSettings:
    """[networkmanager]: follow NetworkManager (auto mode, per-connection policies)."""

    enabled: bool = True
    auto: tuple[AutoPolicy, ...] = ()


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    state_dir: Path = Path("/var/lib/tproxyd")
    runtime_dir: Path = Path("/run/tproxyd")
    tproxy: TproxySettings = field(default_factory=TproxySettings)
    bypass: BypassSettings = field(default_factory=BypassSettings)
    link_defaults: dict[str, LinkMode] = field(default_factory=dict)  # [links]: modes until a choice overrides
    core: CoreSettings = field(default_factory=CoreSettings)
    networkmanager: NetworkManagerSettings = field(default_factory=NetworkManagerSettings)
    # The user's bypass CIDRs and files, parsed and merged once at load time.
    user_bypass: AddressSet = field(default_factory=AddressSet)


@dataclass(frozen=True)
class LinkFact:
    name: str
    index: int
    up: bool


@dataclass(frozen=True)
class AddressFact:
    link_index: int
    family: int  # 4 or 6
    address: str
    prefixlen: int


@dataclass(frozen=True)
class Facts:
    """What the kernel says right now (read by the facts adapter at every reconcile)."""

    links: tuple[LinkFact, ...] = ()
    addresses: tuple[AddressFact, ...] = ()

    @property
    def link_names(self) -> frozenset[str]:
        return frozenset(link.name for link in self.links)


@dataclass(frozen=True)
class NmDevice:
    """A device NetworkManager knows (realized: it exists in the kernel)."""

    iface: str  # the kernel interface carrying its IP traffic (NM's IpInterface, else Interface)
    type: str  # nm_policy.DEVICE_TYPES name, e.g. "wifi", "ethernet"
    state: int  # NMDeviceState (100 = activated)


@dataclass(frozen=True)
class NmConnection:
    """A NetworkManager connection activating or active on one link (one per device of an
    active connection)."""

    ifname: str  # the kernel interface its traffic uses
    device_type: str
    id: str
    uuid: str
    shared: bool  # ipv4.method or ipv6.method "shared": a hotspot / shared connection
    external: bool = False  # generated by NM for a link configured outside it: never matched by policies
    activated: bool = True  # False while still activating


@dataclass(frozen=True)
class NmFacts:
    """What NetworkManager says. `running` False: NM is not on the bus; the other fields then hold
    what it said last (a crashed or restarting NM leaves the links as they were, so we do too)."""

    running: bool = False
    asleep: bool = False
    devices: tuple[NmDevice, ...] = ()
    connections: tuple[NmConnection, ...] = ()
    primary: str = ""  # uuid of the primary connection (the default route's), "" for none

    def connection_on(self, ifname: str) -> NmConnection | None:
        return next((c for c in self.connections if c.ifname == ifname), None)


@dataclass(frozen=True)
class NftState:
    """Everything that goes into table `inet tproxyd`.

    `settings` change only with the config (a full, atomic replace); the bypass sets change
    with the config too, and the link and local-subnet sets with the network (element updates,
    see rules.nft.element_changes)."""

    settings: TproxySettings
    bypass: AddressSet
    lan_links: frozenset[str]
    host_links: frozenset[str]
    local: AddressSet


@dataclass(frozen=True, order=True)
class RuleSpec:
    """`ip [-6] rule add fwmark MARK lookup TABLE priority PRIORITY`."""

    family: int  # 4 or 6
    fwmark: int
    table: int
    priority: int


@dataclass(frozen=True, order=True)
class RouteSpec:
    """`ip [-6] route add local default dev lo table TABLE`."""

    family: int
    table: int


@dataclass(frozen=True)
class RoutingState:
    rules: tuple[RuleSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()


@dataclass(frozen=True)
class DesiredState:
    """None for nft means: no table at all (and then no routing either)."""

    nft: NftState | None
    routing: RoutingState
    active_links: tuple[str, ...] = ()
