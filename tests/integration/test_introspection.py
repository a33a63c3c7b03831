"""The live object introspects exactly as the checked-in dbus/io.github.Tproxyd.Manager1.xml,
interface by interface, and behaves as it says (names, signatures, property types)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from tproxy_service.bus import names

from . import harness as h

pytestmark = pytest.mark.root

XML = h.REPO / "dbus" / "io.github.Tproxyd.Manager1.xml"


def _annotations(el: ET.Element) -> dict[str, str]:
    return {a.attrib["name"]: a.attrib["value"] for a in el.findall("annotation")}


def _args(el: ET.Element) -> list[tuple[str, str, str, dict[str, str]]]:
    return [
        (a.attrib.get("name", ""), a.attrib["type"], a.attrib.get("direction", "in"), _annotations(a))
        for a in el.findall("arg")
    ]


def canonical(root: ET.Element) -> dict[str, dict[str, Any]]:
    """interface name -> its methods, signals, properties and annotations, order-insensitive
    except for argument order (which is part of a signature)."""
    interfaces = {}
    for iface in root.findall("interface"):
        interfaces[iface.attrib["name"]] = {
            "methods": {m.attrib["name"]: (_args(m), _annotations(m)) for m in iface.findall("method")},
            "signals": {
                s.attrib["name"]: ([(n, t, a) for n, t, _d, a in _args(s)], _annotations(s))
                for s in iface.findall("signal")
            },
            "properties": {
                p.attrib["name"]: (p.attrib["type"], p.attrib["access"], _annotations(p))
                for p in iface.findall("property")
            },
            "annotations": _annotations(iface),
        }
    return interfaces


def live_xml(bus: h.PrivateBus) -> ET.Element:
    proc = h.as_user(h.PLAIN, ["busctl", "introspect", "--xml-interface", names.BUS_NAME, names.OBJECT_PATH], bus.env())
    assert proc.returncode == 0, proc.stderr
    return ET.fromstring(proc.stdout)


def test_live_introspection_equals_checked_in_xml(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    shipped = canonical(ET.parse(XML).getroot())
    live = canonical(live_xml(bus))
    assert sorted(live) == sorted(shipped)
    for name in shipped:
        assert live[name] == shipped[name], f"interface {name} differs from {XML.name}"
    assert names.MANAGER_IFACE in live


def test_object_is_found_from_the_root(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    proc = h.as_user(h.PLAIN, ["busctl", "tree", "--list", names.BUS_NAME], bus.env())
    assert proc.returncode == 0, proc.stderr
    assert names.OBJECT_PATH in proc.stdout.split()


def test_live_object_behaves_as_the_xml_says(daemon: h.Tproxyd, bus: h.PrivateBus) -> None:
    manager = canonical(ET.parse(XML).getroot())[names.MANAGER_IFACE]
    props = bus.properties()
    assert sorted(props) == sorted(manager["properties"])
    for prop, (signature, access, _doc) in manager["properties"].items():
        assert access == "read"
        proc = h.as_user(
            h.ROOT, ["busctl", "get-property", names.BUS_NAME, names.OBJECT_PATH, names.MANAGER_IFACE, prop], bus.env()
        )
        assert proc.stdout.split(" ", 1)[0] == signature, prop
    for method, (args, method_notes) in manager["methods"].items():
        # Every method names its polkit action, and refuses any other signature.
        assert method_notes["io.github.Tproxyd.PolkitAction"] in (names.ACTION_TOGGLE, names.ACTION_CONFIGURE)
        wrong = "".join(t for _n, t, _d, _a in args) + "i"
        body = [("x" if t == "s" else True) for _n, t, _d, _a in args] + [7]
        reply = bus.call(method, wrong, body)
        assert reply.error == names.ERROR_INVALID_ARGS, (method, reply)
        assert method in reply.message
