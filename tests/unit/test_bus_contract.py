"""The D-Bus contract without a bus: the checked-in introspection XML is what the service serves,
and domain errors map to the documented error names."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from dbus_fast import Message

from tproxy_service.bus import names
from tproxy_service.bus.errors import Busy, NotAuthorized, error_reply
from tproxy_service.bus.spec import METHODS, introspect_node
from tproxy_service.errors import ConfigError, InvalidArgument, KernelError, TproxydError

XML = Path(__file__).resolve().parents[2] / "dbus" / "io.github.Tproxyd.Manager1.xml"


def _canon(el: ET.Element) -> str:
    el = ET.fromstring(ET.tostring(el))
    el.attrib.pop("name", None)
    for node in el.iter():
        node.tail = node.text = None
    return ET.tostring(el, encoding="unicode")


def test_checked_in_xml_is_what_the_service_serves() -> None:
    served = ET.fromstring(introspect_node(names.OBJECT_PATH).tostring())
    assert _canon(served) == _canon(ET.parse(XML).getroot())


def test_every_method_checks_a_contract_action() -> None:
    assert {m.name: m.action for m in METHODS} == {
        "EnableLink": names.ACTION_TOGGLE,
        "DisableLink": names.ACTION_TOGGLE,
        "SetEnabled": names.ACTION_TOGGLE,
        "Reapply": names.ACTION_TOGGLE,
        "Reload": names.ACTION_CONFIGURE,
    }
    assert {m.name: m.signature for m in METHODS} == {
        "EnableLink": "ss",
        "DisableLink": "s",
        "SetEnabled": "b",
        "Reapply": "",
        "Reload": "",
    }


def test_errors_map_to_documented_names_with_one_sentence() -> None:
    call = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH, member="EnableLink", serial=7)
    call.sender = ":1.5"
    cases = {
        InvalidArgument("bad name"): names.ERROR_INVALID_ARGUMENT,
        ConfigError("config.toml:3: tproxy.port: must be between 1 and 65535, got 0"): names.ERROR_INVALID_CONFIG,
        KernelError("applying failed"): names.ERROR_FAILED,
        TproxydError("could not save"): names.ERROR_FAILED,
        NotAuthorized("not authorized to toggle tproxyd (polkit)"): names.ERROR_ACCESS_DENIED,
        Busy("tproxyd is busy: this connection already has 16 calls in flight; wait for their replies"): (
            names.ERROR_BUSY
        ),
    }
    for exc, name in cases.items():
        reply = error_reply(call, exc)
        assert (reply.error_name, reply.body) == (name, [str(exc)])
    crash = error_reply(call, ZeroDivisionError("secret detail"))
    assert crash.error_name == names.ERROR_FAILED
    assert "secret" not in crash.body[0] and "Traceback" not in crash.body[0]
