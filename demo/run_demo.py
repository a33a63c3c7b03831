"""`make demo`: the whole of tproxyd working in a sandbox, without touching the host's network.

    tpm-cli (LAN client) --- tpm-gw (tproxyd + supervised v2ray core) --- tpm-up (SOCKS proxy,
    10.90.0.2                 tpm-gc | tpm-gu                              router) --- tpm-srv
                                                                          203.0.113.2   198.51.100.2

The gateway's core forwards everything to a SOCKS proxy (a second v2ray) in tpm-up, so a request
that went through tproxyd reaches the server *from the SOCKS proxy's address* (198.51.100.1),
and a direct one from the client's own (10.90.0.2). Real components throughout: network
namespaces and nftables, a private system bus with the shipped policy, polkitd, a systemd
manager running the shipped core unit, tproxyd, v2ray, tproxyctl. Every step says what it
proves; the exit status is 0 only if every step proved it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e import harness as h  # noqa: E402  (the demo reuses the test harness)
from tests.e2e.usermanager import UserManager  # noqa: E402
from tests.integration.harness import Polkit, PrivateBus  # noqa: E402
from tests.tproxyd_config import write_config  # noqa: E402

CLI, GW, UP, SRV = "tpm-cli", "tpm-gw", "tpm-up", "tpm-srv"
LAN_LINK, UP_LINK = "tpm-gc", "tpm-gu"
CLIENT, GW_LAN, GW_UP, SOCKS, ROUTER_SRV, SERVER = (
    "10.90.0.2", "10.90.0.1", "203.0.113.1", "203.0.113.2", "198.51.100.1", "198.51.100.2",
)  # fmt: skip
SOCKS_PORT = 1080
TPROXYCTL = REPO / ".venv" / "bin" / "tproxyctl"
CORE_UNIT = "tproxyd-core.service"


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.failures: list[str] = []
        self.step_no = 0
        self.env: dict[str, str] = {}

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n== {self.step_no}. {title}", flush=True)

    def prove(self, claim: str, check: Callable[[], bool], detail: Callable[[], str] = lambda: "") -> None:
        try:
            ok = check()
        except AssertionError as e:
            ok, reason = False, str(e)
            detail = lambda: reason  # noqa: E731
        print(f"   {'OK  ' if ok else 'FAIL'} proves: {claim}" + (f"  ({detail()})" if detail() else ""), flush=True)
        if not ok:
            self.failures.append(claim)

    def tproxyctl(self, *args: str) -> str:
        proc = h.in_ns(GW, str(TPROXYCTL), *args, check=False)
        out = (proc.stdout + proc.stderr).rstrip()
        print("   $ tproxyctl " + " ".join(args))
        print("\n".join("     " + line for line in out.splitlines()), flush=True)
        return out

    def request(self) -> str:
        """One HTTP request from the LAN client to the server; returns the address the server saw."""
        out = h.in_ns(CLI, "curl", "-sS", "-m", "5", f"http://{SERVER}:8080/demo", check=False).stdout
        return out.split("peer=", 1)[1].split()[0] if "peer=" in out else f"no answer ({out!r})"


NETWORK = h.Network(
    namespaces=(CLI, GW, UP, SRV),
    veths=(
        (CLI, "tpm-c0", f"{CLIENT}/24", GW, LAN_LINK, f"{GW_LAN}/24"),
        (GW, UP_LINK, f"{GW_UP}/24", UP, "tpm-u0", f"{SOCKS}/24"),
        (UP, "tpm-u1", f"{ROUTER_SRV}/24", SRV, "tpm-s0", f"{SERVER}/24"),
    ),
    routes=(
        (CLI, "default", GW_LAN),
        (GW, "default", SOCKS),
        (UP, "10.90.0.0/24", GW_UP),
        (SRV, "default", ROUTER_SRV),
    ),
    forwarding=(GW, UP),
)


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


@contextmanager
def process(proc: h.subprocess.Popen[bytes]) -> Iterator[h.subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        h.stop_process(proc)


def run_demo(demo: Demo, stack: ExitStack) -> None:
    w = demo.workdir
    demo.step("A sandbox network: LAN client -> gateway -> SOCKS proxy/router -> server (namespaces tpm-*)")
    stack.callback(lambda: [h.delete_namespace(ns) for ns in (CLI, GW, UP, SRV)])
    NETWORK.build()
    stack.enter_context(process(h.start_peer_server(SRV, w / "server.log", (8080,), ())))
    socks = write_json(
        w / "socks.json",
        {
            "log": {"loglevel": "warning"},
            "inbounds": [{"listen": SOCKS, "port": SOCKS_PORT, "protocol": "socks", "settings": {"udp": True}}],
            "outbounds": [{"protocol": "freedom"}],
        },
    )
    stack.enter_context(process(h.spawn(UP, [h.V2RAY, "-config", str(socks)], w / "socks.log")))
    h.wait_listening(UP, {("tcp", f"{SOCKS}:{SOCKS_PORT}")}, "the SOCKS proxy")
    seen = demo.request()
    demo.prove(f"without tproxyd the server sees the client itself ({CLIENT})", lambda: seen == CLIENT, lambda: seen)

    demo.step("A private system bus with tproxyd's shipped policy, the real polkitd, a real systemd manager")
    bus = PrivateBus(w)
    bus.start()
    stack.callback(bus.stop)
    polkit = Polkit(w, bus)
    polkit.start()
    stack.callback(polkit.stop)
    manager = UserManager(w / "systemd", "tproxyd-demo")
    manager.start()
    stack.callback(manager.stop)
    # The shipped core unit; the drop-in only puts it in the gateway namespace and shows it the
    # demo's directory (its config and logs), which lies under the /tmp that PrivateTmp= hides.
    manager.install_unit(
        REPO / "systemd" / CORE_UNIT, f"[Service]\nNetworkNamespacePath=/run/netns/{GW}\nBindPaths={w}\n"
    )
    demo.prove("polkitd owns its name on the demo bus", lambda: bus.has_owner("org.freedesktop.PolicyKit1"))

    demo.step("tproxyd on the gateway, its core to be run by systemd (nothing proxied yet)")
    core = write_json(
        w / "core.json",
        {
            "log": {"loglevel": "warning", "access": str(w / "core-access.log")},
            "outbounds": [
                {
                    "tag": "to-socks",
                    "protocol": "socks",
                    "settings": {"servers": [{"address": SOCKS, "port": SOCKS_PORT}]},
                }
            ],
        },
    )
    config = write_config(
        w / "tproxyd.toml",
        runtime_dir=manager.runtime_dir / "tproxyd",
        core={"config": core, "systemd_bus": manager.bus_address},
    )
    log = w / "tproxyd.log"
    daemon = h.spawn(GW, [str(h.TPROXYD), "--config", str(config)], log, env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
    stack.enter_context(process(daemon))
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address  # for tproxyctl, run in the gateway namespace
    h.wait_until(lambda: "tproxyd ready" in log.read_text() or daemon.poll() is not None, 30, "tproxyd ready")
    demo.prove("tproxyd is up and owns io.github.Tproxyd", lambda: bus.has_owner("io.github.Tproxyd"))
    demo.tproxyctl("status")

    demo.step(f"tproxyctl enable {LAN_LINK} --mode lan: proxy the LAN behind the gateway")
    demo.tproxyctl("enable", LAN_LINK, "--mode", "lan")
    h.wait_until(lambda: bus.properties()["State"] in ("active", "failed"), 20, "State active")
    demo.prove(
        "the systemd manager started the core unit",
        lambda: manager.systemctl("is-active", CORE_UNIT, check=False).strip() == "active",
    )
    seen = demo.request()
    demo.prove(
        f"the client's request reached the server from the SOCKS proxy's address ({ROUTER_SRV}): "
        "diverted by nftables TPROXY into the core, out through the SOCKS proxy",
        lambda: seen == ROUTER_SRV,
        lambda: f"server saw {seen}",
    )
    access = h.AccessLog(w / "core-access.log")
    line = h.wait_until(
        lambda: next((x for x in access.text().splitlines() if f"{SERVER}:8080" in x), ""), 5, "access line"
    )
    demo.prove("the core's access log lists the flow", lambda: bool(line), lambda: line.strip())
    demo.tproxyctl("status")

    demo.step("tproxyctl off: the master switch")
    demo.tproxyctl("off")
    h.wait_until(lambda: bus.properties()["State"] == "off", 20, "State off")
    seen = demo.request()
    demo.prove(
        f"traffic goes direct again: the server sees the client ({CLIENT})", lambda: seen == CLIENT, lambda: seen
    )
    demo.prove(
        "no table of ours is left in the gateway",
        lambda: "tproxyd" not in h.in_ns(GW, "nft", "list", "tables").stdout,
    )
    demo.prove(
        "the core unit was stopped", lambda: manager.systemctl("is-active", CORE_UNIT, check=False).strip() != "active"
    )


def main() -> int:
    if os.geteuid() != 0:
        print("make demo: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tproxyd-demo-"))
    workdir.chmod(0o755)
    demo = Demo(workdir)
    try:
        with ExitStack() as stack:
            run_demo(demo, stack)
            demo.step("Cleaning up: stopping everything, deleting the namespaces")
    except AssertionError as e:
        demo.failures.append(str(e))
        print(f"   FAIL {e}", file=sys.stderr)
    left = [ns for ns in h.netns_list() if ns.startswith("tpm-")]
    demo.prove("nothing is left behind", lambda: not left, lambda: ", ".join(left))
    if demo.failures:
        print(f"\nDemo FAILED: {len(demo.failures)} step(s) did not prove their point (logs: {workdir})")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print("\nDemo passed: every step proved its point.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
