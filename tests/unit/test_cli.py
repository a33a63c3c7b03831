"""tproxyctl's pure parts: how status and changes read, and argument handling."""

from __future__ import annotations

import pytest

from tproxy_service import cli

PROPS = {
    "Enabled": True,
    "Links": {"wlan0": "host", "br-lan": "lan", "usb0": ""},
    "ActiveLinks": ["wlan0"],
    "State": "active",
    "CoreState": "active",
    "FailurePolicy": "open",
    "LastError": "",
    "Warnings": [],
    "Version": "0.1.0",
}


def test_status_table() -> None:
    assert cli.format_status(PROPS).splitlines()[-4:] == [
        "LINK    MODE  ACTIVE",
        "br-lan  lan   no",
        "usb0    auto  no",
        "wlan0   host  yes",
    ]
    assert "No links configured" in cli.format_status({**PROPS, "Links": {}, "ActiveLinks": []})


def test_status_shows_each_warning_on_its_own_line() -> None:
    assert "Warning" not in cli.format_status(PROPS)
    lines = cli.format_status({**PROPS, "Warnings": ["no dns section", "another"]}).splitlines()
    assert lines[5:7] == ["Warning:        no dns section", "Warning:        another"]
    assert lines[7].startswith("Version:")


def test_status_lists_links_a_networkmanager_policy_proxies() -> None:
    props = {**PROPS, "Links": {"wlan0": "host"}, "ActiveLinks": ["wlan0", "wlp0s1"]}
    assert cli.format_status(props).splitlines()[-3:] == [
        "LINK    MODE    ACTIVE",
        "wlan0   host    yes",
        "wlp0s1  policy  yes",
    ]


def test_change_lines() -> None:
    lines = cli.format_change({"Links": {"usb0": ""}, "Enabled": False, "LastError": ""}).splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["Enabled: no", 'LastError: ""', "Links: usb0=auto"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["enable"])
    assert e.value.code == cli.EXIT_USAGE


def test_exit_codes_are_distinct() -> None:
    codes = [cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_INVALID, cli.EXIT_DENIED, cli.EXIT_CONFIG,
             cli.EXIT_UNREACHABLE, cli.EXIT_BUSY]  # fmt: skip
    assert len(set(codes)) == len(codes)
