"""monitors/networkmanager.py, its pure parts: NetworkManager's D-Bus properties -> NmFacts, the
shared-method test, and which signals matter. (The D-Bus side runs against the real
NetworkManager in tests/nm.)"""

from __future__ import annotations

from dbus_fast import Message, Variant

from tproxy_service.bus.call import plain
from tproxy_service.bus.names import NM_ACTIVE_IFACE, NM_DEVICE_IFACE, NM_IFACE, PROPERTIES_IFACE
from tproxy_service.model import NmConnection, NmDevice
from tproxy_service.monitors.networkmanager import ActiveProps, _relevant, build_facts, is_shared, nm_ifname

DEV = "/org/freedesktop/NetworkManager/Devices/"
AC = "/org/freedesktop/NetworkManager/ActiveConnection/"
DEVICES = {
    DEV + "1": {"Interface": "lo", "IpInterface": "lo", "DeviceType": 32, "State": 100},
    DEV + "2": {"Interface": "wlp2s0", "IpInterface": "wlp2s0", "DeviceType": 2, "State": 100},
    DEV + "3": {"Interface": "ttyUSB0", "IpInterface": "ppp0", "DeviceType": 8, "State": 70},
    DEV + "4": {"Interface": "veth1", "IpInterface": "", "DeviceType": 20, "State": 30},
}


def active(
    n: int, device: int, state: int = 2, *, flags: int = 0, vpn: bool = False, shared: bool = False
) -> ActiveProps:
    return ActiveProps(AC + str(n), f"conn{n}", f"uuid-{n}", state, flags, (DEV + str(device),), vpn, shared)


def test_build_facts() -> None:
    actives = [
        active(1, 1, flags=0x80 | 0x4),  # lo: external
        active(2, 2, shared=True),
        active(3, 3, state=1),  # a modem still activating: its IP interface is ppp0
        active(4, 2, vpn=True),  # a plugin VPN on top of the Wi-Fi: not a link of its own
        active(5, 4, state=3),  # deactivating: gone for us
    ]
    facts = build_facts({"State": 70, "PrimaryConnection": AC + "2"}, DEVICES, actives)
    assert facts.running and not facts.asleep and facts.primary == "uuid-2"
    assert facts.devices == (
        NmDevice("lo", "loopback", 100),
        NmDevice("ppp0", "modem", 70),
        NmDevice("veth1", "ethernet", 30),  # nmcli shows a veth as ethernet, so do we
        NmDevice("wlp2s0", "wifi", 100),
    )
    assert facts.connections == (
        NmConnection("lo", "loopback", "conn1", "uuid-1", shared=False, external=True),
        NmConnection("ppp0", "modem", "conn3", "uuid-3", shared=False, activated=False),
        NmConnection("wlp2s0", "wifi", "conn2", "uuid-2", shared=True),
    )
    assert build_facts({"State": 10}, {}, []).asleep


def test_shared_method() -> None:
    settings = {"ipv4": {"method": Variant("s", "shared")}, "ipv6": {"method": Variant("s", "ignore")}}
    assert is_shared(plain(settings))
    assert is_shared({"ipv6": {"method": "shared"}})
    assert not is_shared({"ipv4": {"method": "auto"}})
    assert not is_shared({})


def changed(path: str, iface: str, **props: Variant) -> Message:
    return Message.new_signal(path, PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as", [iface, props, []])


def test_only_signals_that_can_change_facts_matter() -> None:
    assert _relevant(changed(DEV + "2", NM_DEVICE_IFACE, State=Variant("u", 100))) == "Devices/2 State"
    assert _relevant(changed(AC + "7", NM_ACTIVE_IFACE, State=Variant("u", 2))) == "ActiveConnection/7 State"
    assert _relevant(changed("/org/freedesktop/NetworkManager", NM_IFACE, PrimaryConnection=Variant("o", "/")))
    assert _relevant(Message.new_signal("/org/freedesktop/NetworkManager", NM_IFACE, "DeviceAdded", "o", [DEV + "9"]))
    # IP configs, statistics, connectivity: netlink (or nothing) covers them.
    assert _relevant(changed(DEV + "2", NM_DEVICE_IFACE, Ip4Config=Variant("o", "/x"))) is None
    assert _relevant(changed("/org/freedesktop/NetworkManager", NM_IFACE, Connectivity=Variant("u", 4))) is None


def test_interface_names_are_unescaped() -> None:
    """NetworkManager escapes `Interface` on D-Bus (seen with a link named `\\`: "\\\\"); the
    kernel's name is what the link sets must hold."""
    assert nm_ifname("wlan0") == "wlan0" and nm_ifname("éééééééz") == "éééééééz"
    assert nm_ifname("\\\\") == "\\" and nm_ifname("a\\\\b") == "a\\b"
    assert nm_ifname("\\\\123") == "\\123"  # an escaped backslash, then digits
    assert nm_ifname("x\\303\\251") == "xé"  # octal bytes (NetworkManager's form for unsafe ones)
    devices = {DEV + "9": {"Interface": "a\\\\b", "IpInterface": "", "DeviceType": 20, "State": 100}}
    facts = build_facts({}, devices, [active(9, 9)])
    assert [c.ifname for c in facts.connections] == ["a\\b"]
