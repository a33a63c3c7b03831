"""tproxyctl: drive tproxyd over D-Bus. It never touches the kernel or the daemon's files: what it
may do is decided by polkit in the daemon, so it works (or is refused) the same for every user."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from . import __version__
from .bus.call import CallError, add_match, call_method, method_call, plain
from .bus.connection import connect_system_bus
from .bus.names import (
    BUS_NAME,
    DBUS_NAME,
    ERROR_ACCESS_DENIED,
    ERROR_BUSY,
    ERROR_FAILED,
    ERROR_INVALID_ARGUMENT,
    ERROR_INVALID_CONFIG,
    MANAGER_IFACE,
    OBJECT_PATH,
    PROPERTIES_IFACE,
)
from .errors import InvalidArgument
from .model import WITH_AUTO, LinkChoice

EXIT_OK = 0
EXIT_FAILED = 1  # tproxyd could not apply it (nothing changed), or an unexpected error
EXIT_USAGE = 2  # bad command line
EXIT_INVALID = 3  # bad interface name or mode
EXIT_DENIED = 4  # polkit said no
EXIT_CONFIG = 5  # reload: the config file is invalid (the running one is kept)
EXIT_UNREACHABLE = 6  # no system bus, or tproxyd is not running
EXIT_BUSY = 7  # too many calls in flight (tproxyd refused this one at once): retry later

_EXIT_FOR_ERROR = {
    ERROR_FAILED: EXIT_FAILED,
    ERROR_INVALID_ARGUMENT: EXIT_INVALID,
    ERROR_ACCESS_DENIED: EXIT_DENIED,
    ERROR_INVALID_CONFIG: EXIT_CONFIG,
    ERROR_BUSY: EXIT_BUSY,
    "org.freedesktop.DBus.Error.ServiceUnknown": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.NameHasNoOwner": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.NoReply": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.Disconnected": EXIT_UNREACHABLE,
}

EPILOG = f"""\
commands:
  status [--json]              state, links, core and warnings; --json prints the D-Bus properties as JSON
  enable IFNAME [--mode MODE]  proxy a link; MODE: host (this machine's own traffic leaving via
                               IFNAME), lan (traffic from other hosts arriving on IFNAME: gateway,
                               hotspot), both, or auto (lan for a shared/hotspot connection, else
                               host; the default). The link need not exist yet.
  disable IFNAME               stop proxying a link
  on | off                     the master switch; off removes every rule, the links are kept
  reapply                      re-read the network state and re-apply the rules
  reload                       re-read the config file (refused, and nothing changes, if invalid)
  monitor [--json]             print every change as it happens, until Ctrl-C

Choices made with enable/disable/on/off are saved by tproxyd and survive restarts; they override
the [links] defaults of its config file.

With failure_policy = "closed" (a kill switch) a proxied link never goes direct: not while the
core is down, nor while tproxyd is stopped or restarting (its rules stay and block). off, or
disable of the link, releases it (D-Bus starts a stopped tproxyd for that).

Who may do what is decided by polkit in tproxyd: reading (status, monitor) is open to everyone;
enable/disable/on/off/reapply need io.github.Tproxyd.toggle, reload needs
io.github.Tproxyd.configure (both: administrator authentication, unless a polkit rule says
otherwise). On a terminal tproxyctl lets polkit ask for a password; --no-ask-password stops that.

exit status:
  {EXIT_OK}  done
  {EXIT_FAILED}  tproxyd could not apply it (the kernel refused; nothing was changed), or another error
  {EXIT_USAGE}  bad command line
  {EXIT_INVALID}  invalid interface name or mode
  {EXIT_DENIED}  not authorized (polkit)
  {EXIT_CONFIG}  reload: the config file is invalid (the running configuration is kept)
  {EXIT_UNREACHABLE}  the system bus or tproxyd is not reachable
  {EXIT_BUSY}  tproxyd is busy (too many calls in flight from this connection or from unprivileged
     callers); nothing was done, retry later

examples:
  tproxyctl enable wlan0 --mode host
  tproxyctl enable br-lan --mode lan
  tproxyctl off
  tproxyctl status --json | jq .ActiveLinks
"""


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tproxyctl",
        description="Control tproxyd, the per-interface transparent proxy service, over D-Bus.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tproxyctl {__version__}")
    parser.add_argument("--no-ask-password", action="store_true", help="never let polkit prompt for a password")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="show state, links, core and warnings")
    status.add_argument("--json", action="store_true", help="machine-readable")
    enable = sub.add_parser("enable", help="proxy a link")
    enable.add_argument("ifname")
    enable.add_argument("--mode", default="auto", help="host, lan, both or auto (default)")
    disable = sub.add_parser("disable", help="stop proxying a link")
    disable.add_argument("ifname")
    sub.add_parser("on", help="master switch on")
    sub.add_parser("off", help="master switch off (links are kept)")
    sub.add_parser("reapply", help="re-apply the rules")
    sub.add_parser("reload", help="re-read the config file")
    monitor = sub.add_parser("monitor", help="print changes until Ctrl-C")
    monitor.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser.parse_args(argv)


class Client:
    def __init__(self, bus: MessageBus, interactive: bool) -> None:
        self.bus = bus
        self.interactive = interactive

    async def call(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if self.interactive else MessageFlag.NONE
        return await _call(self.bus, method_call(BUS_NAME, OBJECT_PATH, MANAGER_IFACE, member, signature, body, flags))

    async def properties(self) -> dict[str, Any]:
        body = await _call(
            self.bus, method_call(BUS_NAME, OBJECT_PATH, PROPERTIES_IFACE, "GetAll", "s", [MANAGER_IFACE])
        )
        props: dict[str, Any] = plain(body[0])
        return props


async def _call(bus: MessageBus, message: Message) -> list[Any]:
    """bus.call.call, with an error reply turned into the CliError (and exit code) it means."""
    try:
        return await call_method(bus, message)
    except CallError as e:
        text, code = e.text or e.name, _EXIT_FOR_ERROR.get(e.name, EXIT_FAILED)
        if code == EXIT_UNREACHABLE:
            text = f"tproxyd is not running ({BUS_NAME} is not on the system bus)"
        elif e.name.startswith("org.freedesktop.DBus.Error.Spawn"):
            text, code = f"tproxyd could not be started: {text}", EXIT_UNREACHABLE
        raise CliError(text, code) from None


def _mode_text(mode: str) -> str:
    """A Links value as the user spells it ("" is auto)."""
    try:
        return LinkChoice.from_bus(mode).value
    except InvalidArgument:  # a newer tproxyd's mode: show it as it is
        return mode


def format_status(props: dict[str, Any]) -> str:
    error = props["LastError"] or "-"
    lines = [
        f"State:          {props['State']}",
        f"Enabled:        {'yes' if props['Enabled'] else 'no'}",
        f"Core:           {props['CoreState']}",
        f"Failure policy: {props['FailurePolicy']}",
        f"Last error:     {error}",
        # Absent from a tproxyd older than the property: no warnings then.
        *(f"Warning:        {warning}" for warning in props.get("Warnings", [])),
        f"Version:        {props['Version']}",
        "",
    ]
    links: dict[str, str] = props["Links"]
    # Links a [[networkmanager.auto]] policy proxies are active without being configured.
    by_policy = sorted(set(props["ActiveLinks"]) - set(links))
    if not links and not by_policy:
        lines.append("No links configured (tproxyctl enable IFNAME).")
        return "\n".join(lines)
    rows = [
        (name, _mode_text(mode), "yes" if name in props["ActiveLinks"] else "no")
        for name, mode in sorted(links.items())
    ]
    rows += [(name, "policy", "yes") for name in by_policy]
    width = max(len("LINK"), *(len(name) for name, _, _ in rows))
    mode_width = max(len("MODE"), *(len(mode) for _, mode, _ in rows))
    lines.append(f"{'LINK':<{width}}  {'MODE':<{mode_width}}  ACTIVE")
    lines += [f"{name:<{width}}  {mode:<{mode_width}}  {active}" for name, mode, active in rows]
    return "\n".join(lines)


def format_change(changed: dict[str, Any]) -> str:
    def show(name: str, value: Any) -> str:
        if name == "Links":
            return ", ".join(f"{k}={_mode_text(v)}" for k, v in sorted(value.items())) or "(none)"
        if name == "ActiveLinks":
            return ", ".join(value) or "(none)"
        if name == "Warnings":
            return "; ".join(value) or "(none)"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value) if value != "" else '""'

    stamp = time.strftime("%H:%M:%S")
    return "\n".join(f"{stamp} {name}: {show(name, value)}" for name, value in sorted(changed.items()))


async def _monitor(client: Client, as_json: bool) -> int:
    rule = (
        f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
        f"interface='{PROPERTIES_IFACE}',member='PropertiesChanged',arg0='{MANAGER_IFACE}'"
    )
    owner_rule = f"type='signal',sender='{DBUS_NAME}',member='NameOwnerChanged',arg0='{BUS_NAME}'"
    done = asyncio.Event()

    def emit(kind: str, changed: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps({"event": kind, "changed": changed}, sort_keys=True), flush=True)
        elif kind == "started":
            print(f"{time.strftime('%H:%M:%S')} tproxyd is running", flush=True)
        elif kind == "stopped":
            print(f"{time.strftime('%H:%M:%S')} tproxyd stopped", flush=True)
        else:
            print(format_change(changed), flush=True)

    def on_message(msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL:
            return False
        if msg.member == "PropertiesChanged" and msg.path == OBJECT_PATH and msg.body[0] == MANAGER_IFACE:
            emit("changed", plain(msg.body[1]))
        elif msg.member == "NameOwnerChanged" and msg.body[0] == BUS_NAME:
            emit("started" if msg.body[2] else "stopped", {})
        return False

    client.bus.add_message_handler(on_message)
    for match in (rule, owner_rule):  # subscribe before reading, so no change is missed
        try:
            await add_match(client.bus, match)
        except CallError as e:
            raise CliError(e.text or e.name, EXIT_FAILED) from None
    try:
        emit("initial", await client.properties())
    except CliError as e:
        if e.code != EXIT_UNREACHABLE:
            raise
        print(f"tproxyctl: {e}; waiting for it", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    disconnected = asyncio.ensure_future(client.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    stop = asyncio.ensure_future(done.wait())
    await asyncio.wait([disconnected, stop], return_when=asyncio.FIRST_COMPLETED)
    if not stop.done():
        raise CliError("lost the connection to the system bus", EXIT_UNREACHABLE)
    return EXIT_OK


async def _enable(client: Client, ifname: str, mode: str) -> int:
    try:
        choice = LinkChoice.parse(mode, WITH_AUTO)
    except InvalidArgument as e:
        raise CliError(str(e), EXIT_INVALID) from None
    await client.call("EnableLink", "ss", [ifname, choice.to_bus()])
    props = await client.properties()
    if not props["Enabled"]:
        print(f"{ifname}: {mode}; tproxyd is off, so nothing is proxied (tproxyctl on)")
    elif ifname in props["ActiveLinks"]:
        print(f"{ifname}: proxied ({mode})")
    elif props["State"] == "starting":
        print(f"{ifname}: {mode}; proxied as soon as the core listens (starting)")
    elif props["State"] in ("degraded", "blocked", "failed"):
        print(f"{ifname}: {mode}; not proxied now, tproxyd is {props['State']} (tproxyctl status)")
    else:
        print(f"{ifname}: {mode}; proxied once the link appears")
    return EXIT_OK


async def run(args: argparse.Namespace) -> int:
    try:
        bus = await connect_system_bus()
    except Exception as e:
        raise CliError(f"cannot connect to the system bus: {e or type(e).__name__}", EXIT_UNREACHABLE) from None
    interactive = sys.stdin.isatty() and not args.no_ask_password
    client = Client(bus, interactive)
    try:
        cmd = args.command
        if cmd == "status":
            props = await client.properties()
            print(json.dumps(props, indent=2, sort_keys=True) if args.json else format_status(props))
        elif cmd == "enable":
            return await _enable(client, args.ifname, args.mode)
        elif cmd == "disable":
            await client.call("DisableLink", "s", [args.ifname])
            print(f"{args.ifname}: not proxied")
        elif cmd in ("on", "off"):
            await client.call("SetEnabled", "b", [cmd == "on"])
            print(f"tproxyd is {cmd}")
        elif cmd == "reapply":
            await client.call("Reapply")
        elif cmd == "reload":
            await client.call("Reload")
            print("config reloaded")
        elif cmd == "monitor":
            return await _monitor(client, args.json)
        return EXIT_OK
    finally:
        bus.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CliError as e:
        print(f"tproxyctl: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # e.g. `tproxyctl monitor | head`
        with contextlib.suppress(OSError):
            sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
