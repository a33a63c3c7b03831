"""The Manager1 interface as data: method signatures, polkit actions, property types and docs.

The service dispatches and checks signatures from this table, and the live introspection is
built from it; a test compares that with the checked-in dbus/io.github.Tproxyd.Manager1.xml,
so the contract cannot drift silently."""

from __future__ import annotations

from dataclasses import dataclass

from dbus_fast import ArgDirection, PropertyAccess
from dbus_fast import introspection as intr

from .names import ACTION_CONFIGURE, ACTION_TOGGLE, MANAGER_IFACE, OBJECT_MANAGER_IFACE

DOC = "org.gtk.GDBus.DocString"  # understood by gdbus-codegen and D-Spy
POLKIT_ACTION = "io.github.Tproxyd.PolkitAction"  # informational: the action a method checks
EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"


@dataclass(frozen=True)
class ArgSpec:
    name: str
    signature: str
    doc: str


@dataclass(frozen=True)
class MethodSpec:
    name: str
    args: tuple[ArgSpec, ...]
    action: str
    doc: str

    @property
    def signature(self) -> str:
        return "".join(a.signature for a in self.args)

    def usage(self) -> str:
        """One sentence naming the expected arguments, for InvalidArgs errors."""
        if not self.args:
            return f"{self.name} takes no arguments."
        described = ", ".join(f"{a.name} ({a.signature})" for a in self.args)
        return f"{self.name} takes signature '{self.signature}': {described}."


@dataclass(frozen=True)
class PropertySpec:
    name: str
    signature: str
    doc: str
    emits: str = "true"  # "const" for values that never change while the daemon runs


_IFNAME = ArgSpec(
    "ifname",
    "s",
    "Kernel interface name: 1-15 bytes, printable, no '/', ':' or whitespace, not '.' or '..'. "
    "The link need not exist yet.",
)

METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "EnableLink",
        (
            _IFNAME,
            ArgSpec(
                "mode",
                "s",
                "'host' (this machine's own traffic leaving via the link), 'lan' (traffic arriving "
                "from other hosts: gateway/hotspot), 'both', or '' (auto: 'lan' for a shared/hotspot "
                "NetworkManager connection, else 'host').",
            ),
        ),
        ACTION_TOGGLE,
        "Proxy this link in this mode; takes effect when the link appears. Idempotent. Persisted.",
    ),
    MethodSpec("DisableLink", (_IFNAME,), ACTION_TOGGLE, "Stop proxying this link. Idempotent. Persisted."),
    MethodSpec(
        "SetEnabled",
        (ArgSpec("enabled", "b", "false removes every rule and stops the core; true restores them."),),
        ACTION_TOGGLE,
        "Master switch. Off keeps the per-link choices. Persisted.",
    ),
    MethodSpec(
        "Reapply",
        (),
        ACTION_TOGGLE,
        "Re-read the kernel (and NetworkManager) facts and re-apply the rules.",
    ),
    MethodSpec(
        "Reload",
        (),
        ACTION_CONFIGURE,
        "Re-read the config and bypass files. A bad config is refused (InvalidConfig) and the running state kept.",
    ),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}

PROPERTIES: tuple[PropertySpec, ...] = (
    PropertySpec("Enabled", "b", "The master switch (SetEnabled)."),
    PropertySpec("Links", "a{ss}", "Configured links: ifname -> mode ('host', 'lan', 'both', '' = auto)."),
    PropertySpec(
        "ActiveLinks",
        "as",
        "Links that are present with their rules in place: the configured ones and those a "
        "[[networkmanager.auto]] policy proxies.",
    ),
    PropertySpec(
        "State",
        "s",
        "'off', 'starting', 'active', 'degraded' (core down, traffic direct), 'blocked' (core down, "
        "traffic blocked) or 'failed' (rules could not be applied; see LastError).",
    ),
    PropertySpec(
        "CoreState",
        "s",
        "The proxy core unit's systemd ActiveState, or 'unsupervised' when tproxyd does not run the core.",
    ),
    PropertySpec("FailurePolicy", "s", "'open' or 'closed': what traffic does while the core is down."),
    PropertySpec("LastError", "s", "Why the last reconcile failed; empty after a success."),
    PropertySpec(
        "Warnings",
        "as",
        "What the admin should know about the running config, one sentence each (e.g. a core config "
        "without DNS servers of its own); empty when all is well.",
    ),
    PropertySpec("Version", "s", "The daemon's version.", emits="const"),
)
PROPERTIES_BY_NAME = {p.name: p for p in PROPERTIES}


def introspect_node(path: str) -> intr.Node:
    """What Introspect returns for our object: the standard interfaces we serve, and Manager1."""
    node = intr.Node.default(path)
    node.interfaces = [i for i in node.interfaces if i.name != OBJECT_MANAGER_IFACE]
    node.interfaces.append(introspect_manager())
    return node


def introspect_manager() -> intr.Interface:
    methods = [
        intr.Method(
            m.name,
            in_args=[intr.Arg(a.signature, ArgDirection.IN, a.name, {DOC: a.doc}) for a in m.args],
            out_args=[],
            annotations={DOC: m.doc, POLKIT_ACTION: m.action},
        )
        for m in METHODS
    ]
    properties = [
        intr.Property(p.name, p.signature, PropertyAccess.READ, {DOC: p.doc, EMITS_CHANGED: p.emits})
        for p in PROPERTIES
    ]
    return intr.Interface(
        MANAGER_IFACE,
        methods=methods,
        properties=properties,
        annotations={DOC: "Per-link transparent proxying. Every method is authorized with polkit."},
    )
