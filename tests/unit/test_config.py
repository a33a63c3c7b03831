from __future__ import annotations

from pathlib import Path

import pytest

from tproxy_service.config import load_config, parse_config
from tproxy_service.errors import ConfigError
from tproxy_service.model import AutoPolicy, Config, DnsHijack, FailurePolicy, LinkMode

FULL = """\
state_dir = "state"
runtime_dir = "/tmp/tproxyd-run"

[tproxy]
port = 7893
allow_unprivileged_port = true
mark = 2
core_mark = 255
route_table = 200
rule_priority = 9000
ipv6 = false
udp = true
dns_hijack = false
failure_policy = "closed"

[bypass]
reserved = false
local_subnets = true
cidrs = ["198.51.100.0/24", "2001:db8::/32"]
files = ["list.txt"]

[links]
wlan0 = "host"
"br-lan" = "lan"
"usb0" = "both"

[core]
[networkmanager]
enabled = true

[[networkmanager.auto]]
id = "Cafe Wi-Fi"
mode = "host"

[[networkmanager.auto]]
shared = true
mode = "lan"

[[networkmanager.auto]]
uuid = "7B67D72D-71D7-4E11-8689-37A752D5F460"
type = "wifi"
mode = "auto"
"""


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("203.0.113.0/24\n")
    path = tmp_path / "config.toml"
    path.write_text(FULL)
    c = load_config(path)
    assert c.path == path and c.state_dir == tmp_path / "state"
    assert c.tproxy.port == 7893 and c.tproxy.failure_policy is FailurePolicy.CLOSED and not c.tproxy.ipv6
    assert c.link_defaults == {"wlan0": LinkMode.HOST, "br-lan": LinkMode.LAN, "usb0": LinkMode.BOTH}
    assert len(c.user_bypass.v4) == 2 and len(c.user_bypass.v6) == 1
    assert c.bypass.files == (tmp_path / "list.txt",)
    assert c.networkmanager.enabled
    assert c.networkmanager.auto == (
        AutoPolicy(LinkMode.HOST, id="Cafe Wi-Fi"),
        AutoPolicy(LinkMode.LAN, shared=True),
        AutoPolicy(None, uuid="7b67d72d-71d7-4e11-8689-37a752d5f460", type="wifi"),  # auto; uuid lowercased
    )


def test_defaults() -> None:
    c = parse_config("")
    assert (c.tproxy.port, c.tproxy.mark, c.tproxy.core_mark, c.tproxy.route_table) == (1012, 1, 255, 100)
    assert c.tproxy.ipv6 and c.tproxy.udp and c.bypass.reserved
    assert c.tproxy.dns_hijack is DnsHijack.ALL
    assert (c.bypass.local_min_prefix4, c.bypass.local_min_prefix6) == (16, 48)
    assert parse_config("[bypass]\nlocal_min_prefix4 = 8\nlocal_min_prefix6 = 0\n").bypass.local_min_prefix6 == 0
    assert c.link_defaults == {}
    assert c.networkmanager.enabled and c.networkmanager.auto == ()
    assert c == Config()  # every default is model.py's: an empty file changes none of them


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"off"', DnsHijack.OFF), ('"lan"', DnsHijack.LAN), ('"all"', DnsHijack.ALL), ("true", DnsHijack.LAN),
     ("false", DnsHijack.OFF)],
)  # fmt: skip
def test_dns_hijack_choices_and_old_booleans(value: str, expected: DnsHijack) -> None:
    """true and false keep what they meant before the choice existed: DNS to connected subnets, or none."""
    assert parse_config(f"[tproxy]\ndns_hijack = {value}\n").tproxy.dns_hijack is expected


def test_networkmanager_inline_entries_and_off_switch() -> None:
    c = parse_config('[networkmanager]\nenabled = false\nauto = [{ type = "ethernet", mode = "both" }]\n')
    assert not c.networkmanager.enabled
    assert c.networkmanager.auto == (AutoPolicy(LinkMode.BOTH, type="ethernet"),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[tproxy]\nport = 0\n", r"c\.toml:2: tproxy\.port: must be between 1 and 65535, got 0"),
        ('[tproxy]\n\nport = "80"\n', r"c\.toml:3: tproxy\.port: must be an integer, got '80'"),
        ("[tproxy]\nmark = 7\ncore_mark = 7\n", r"c\.toml:3: tproxy\.core_mark: must differ"),
        ("[tproxy]\nbypass_ct_bit = 32\n", r"c\.toml:2: tproxy\.bypass_ct_bit: must be"),
        ("[tproxy]\nroute_table = 254\n", r"c\.toml:2: tproxy\.route_table: 254 is a kernel-reserved"),
        ('[tproxy]\nipv6 = "yes"\n', r"c\.toml:2: tproxy\.ipv6: must be true or false"),
        ('[tproxy]\ndns_hijack = "on"\n', r'c\.toml:2: tproxy\.dns_hijack: must be "off", "lan" or "all" .*got \'on\''),
        ("[tproxy]\ndns_hijack = 1\n", r"c\.toml:2: tproxy\.dns_hijack: must be .*, got 1$"),
        ('[tproxy]\nfailure_policy = "maybe"\n', r"c\.toml:2: tproxy\.failure_policy: must be \"open\" or"),
        ("[tproxy]\nprot = 1\n", r"c\.toml:2: tproxy\.prot: unknown key"),
        ("colour = 1\n", r"c\.toml:1: colour: unknown key"),
        ('[bypass]\ncidrs = ["198.51.100.0/24", "nope"]\n', r"c\.toml:2: bypass\.cidrs\[1\]: 'nope' is not"),
        (
            "[bypass]\nlocal_min_prefix4 = 33\n",
            r"c\.toml:2: bypass\.local_min_prefix4: must be between 0 and 32, got 33",
        ),
        ("[bypass]\nlocal_min_prefix6 = -1\n", r"c\.toml:2: bypass\.local_min_prefix6: must be between 0 and 128"),
        ('[bypass]\nfiles = "a.txt"\n', r"c\.toml:2: bypass\.files: must be a list of file paths"),
        ('[bypass]\nfiles = ["missing.txt"]\n', r"cannot read CIDR list file .*missing\.txt"),
        ('[links]\n"eth0/1" = "lan"\n', r"c\.toml:2: links\.eth0/1: interface name"),
        (
            '[links]\n"averyveryverylongname" = "lan"\n',
            r"c\.toml:2: links\.averyveryverylongname: .*1-15 bytes",
        ),
        ('[links]\neth0 = "proxy"\n', r"c\.toml:2: links\.eth0: no such mode 'proxy'"),
        ("[links]\neth0 = 1\n", r"c\.toml:2: links\.eth0: mode must be a string"),
        ("links = 3\n", r"c\.toml:1: links: must be a table"),
        ("[tproxy\nport = 1\n", r"c\.toml: invalid TOML"),
        ("networkmanager = 1\n", r"c\.toml:1: networkmanager: must be a table"),
        ("[networkmanager]\nenabled = 1\n", r"c\.toml:2: networkmanager\.enabled: must be true or false, got 1"),
        (
            "[networkmanager]\nfollow = true\n",
            r"c\.toml:2: networkmanager\.follow: unknown key \(known: auto, enabled\)",
        ),
        ("[networkmanager]\nauto = 3\n", r"c\.toml:2: networkmanager\.auto: must be an array of tables"),
        ('[networkmanager.auto]\nid = "x"\n', r"c\.toml:1: networkmanager\.auto: must be an array of tables"),
        (
            '[[networkmanager.auto]]\nid = "a"\nmode = "lan"\n\n[[networkmanager.auto]]\nid = "b"\nmode = "proxy"\n',
            r"c\.toml:7: networkmanager\.auto\[1\]\.mode: no such mode 'proxy': use 'host', 'lan', 'both', 'auto'",
        ),
        ('[[networkmanager.auto]]\nid = "a"\n', r"c\.toml:1: networkmanager\.auto\[0\]: needs a mode"),
        ('[[networkmanager.auto]]\nmode = "lan"\n', r"c\.toml:1: networkmanager\.auto\[0\]: needs at least one of id"),
        ('[[networkmanager.auto]]\nid = ""\nmode = "lan"\n', r"c\.toml:2: networkmanager\.auto\[0\]\.id: must be a"),
        (
            '[[networkmanager.auto]]\nuuid = "nope"\nmode = "lan"\n',
            r"c\.toml:2: networkmanager\.auto\[0\]\.uuid: must be a",
        ),
        (
            '[[networkmanager.auto]]\ntype = "wlan"\nmode = "host"\n',
            r"c\.toml:2: networkmanager\.auto\[0\]\.type: unknown device type 'wlan' \(known: .*wifi",
        ),
        ('[[networkmanager.auto]]\ntype = "loopback"\nmode = "host"\n', r"auto\[0\]\.type: unknown device type"),
        (
            '[[networkmanager.auto]]\nshared = "yes"\nmode = "lan"\n',
            r"c\.toml:2: networkmanager\.auto\[0\]\.shared: must be",
        ),
        (
            '[[networkmanager.auto]]\nssid = "x"\nmode = "lan"\n',
            r"c\.toml:2: networkmanager\.auto\[0\]\.ssid: unknown key",
        ),
        ('[networkmanager]\n\nauto = [{ id = "a" }]\n', r"c\.toml:3: networkmanager\.auto\[0\]: needs a mode"),
    ],
)
def test_errors_name_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(text, "c.toml", tmp_path)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_unprivileged_tproxy_port_needs_saying_so() -> None:
    """A port any local user may bind (>= 1024) would let them keep the core from listening."""
    with pytest.raises(
        ConfigError, match=r"c\.toml:2: tproxy\.port: 12345 is not a privileged port: .* any local user"
    ):
        parse_config("[tproxy]\nport = 12345\n", "c.toml")
    assert parse_config("[tproxy]\nport = 1023\n").tproxy.port == 1023
    allowed = parse_config("[tproxy]\nport = 12345\nallow_unprivileged_port = true\n")
    assert (allowed.tproxy.port, allowed.tproxy.allow_unprivileged_port) == (12345, True)


def test_bypass_file_limits_are_keys(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("198.51.100.0/24\n203.0.113.0/24\n")
    text = '[bypass]\nfiles = ["list.txt"]\nmax_file_lines = 1\n'
    with pytest.raises(ConfigError, match=r"list\.txt has more than 1 lines \(\[bypass\] max_file_lines\)"):
        parse_config(text, "c.toml", tmp_path)
    config = parse_config(text.replace("= 1", "= 2") + "max_file_bytes = 64\n", "c.toml", tmp_path)
    assert (config.bypass.max_file_lines, config.bypass.max_file_bytes) == (2, 64)
    assert len(config.user_bypass.v4) == 2
    with pytest.raises(ConfigError, match=r"c\.toml:4: bypass\.max_file_bytes: must be between 1 and"):
        parse_config(text + "max_file_bytes = 0\n", "c.toml", tmp_path)


def test_config_file_that_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file /dev/zero is a character device; only regular files"):
        load_config(Path("/dev/zero"))
    big = tmp_path / "big.toml"
    big.write_text("#" * (2 << 20))
    with pytest.raises(ConfigError, match=r"big\.toml is larger than 1048576 bytes"):
        load_config(big)


def test_bypass_ct_bit_is_configurable() -> None:
    assert parse_config("").tproxy.bypass_ct_bit == 30
    assert parse_config("[tproxy]\nbypass_ct_bit = 3\n").tproxy.bypass_ct_bit == 3
