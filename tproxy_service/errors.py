"""Domain errors. No D-Bus imports here: the bus layer maps these to D-Bus error names."""


class TproxydError(Exception):
    """Base class: the message is one sentence meant for a person."""


class ConfigError(TproxydError):
    """The config file (or a CIDR list file it names) is invalid; nothing was applied."""


class InvalidArgument(TproxydError):
    """A caller passed a bad interface name or mode."""


class KernelError(TproxydError):
    """Applying nftables or policy-routing state failed; the previous state was restored."""
