"""One NetworkManager.conf for every NetworkManager the tests run (tests/nm's sandbox, the
system tier's container): keyfile connections only, hands off DNS, resolv.conf, the hostname and
connectivity checks, no automatic connections, and leaves the tests' own wiring alone."""

from __future__ import annotations

from collections.abc import Sequence


def networkmanager_conf(unmanaged: Sequence[str]) -> str:
    """NetworkManager.conf text; `unmanaged` are interface names (globs allowed) NM must leave
    alone: the links the tests set up themselves."""
    devices = ";".join(f"interface-name:{name}" for name in unmanaged)
    return f"""\
[main]
plugins=keyfile
dns=none
rc-manager=unmanaged
hostname-mode=none
no-auto-default=*
dhcp=internal
auth-polkit=true

[keyfile]
path=/etc/NetworkManager/system-connections
unmanaged-devices={devices}

[connectivity]
enabled=false

[logging]
level=INFO
"""
