"""Destinations that are never proxied when `[bypass] reserved = true`.

The classic seed list (v2rayA, clash templates) minus the documentation prefixes
192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32: those never appear on the
real internet, so bypassing them gains nothing, and keeping them proxied lets the tests and
the demo model "the internet" with them. This list is matched on destinations only: tproxyd
never bypasses by *source* address (see README, "Which traffic is proxied")."""

RESERVED_V4: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.88.99.0/24",  # deprecated 6to4 relay anycast
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, includes 255.255.255.255 broadcast
)

RESERVED_V6: tuple[str, ...] = (
    "::/127",  # unspecified and loopback
    "::ffff:0:0/96",  # IPv4-mapped
    "64:ff9b:1::/48",  # local-use IPv4/IPv6 translation
    "100::/64",  # discard-only
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)
