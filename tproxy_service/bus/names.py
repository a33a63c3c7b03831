"""Every D-Bus name, path, interface, error name and polkit action id of tproxyd, once
(docs/architecture.md, "The D-Bus contract"). The daemon, tproxyctl, the tests and the bench
import them from here."""

from typing import Final

BUS_NAME: Final = "io.github.Tproxyd"
OBJECT_PATH: Final = "/io/github/Tproxyd"
MANAGER_IFACE: Final = "io.github.Tproxyd.Manager1"

# Our errors (the contract's) ...
ERROR_INVALID_ARGUMENT: Final = "io.github.Tproxyd.Error.InvalidArgument"
ERROR_INVALID_CONFIG: Final = "io.github.Tproxyd.Error.InvalidConfig"
ERROR_FAILED: Final = "io.github.Tproxyd.Error.Failed"
ERROR_BUSY: Final = "io.github.Tproxyd.Error.Busy"  # too many calls in flight: retry later
# ... and the standard ones we send.
ERROR_ACCESS_DENIED: Final = "org.freedesktop.DBus.Error.AccessDenied"
ERROR_INVALID_ARGS: Final = "org.freedesktop.DBus.Error.InvalidArgs"  # wrong signature
ERROR_UNKNOWN_METHOD: Final = "org.freedesktop.DBus.Error.UnknownMethod"
ERROR_UNKNOWN_INTERFACE: Final = "org.freedesktop.DBus.Error.UnknownInterface"
ERROR_UNKNOWN_PROPERTY: Final = "org.freedesktop.DBus.Error.UnknownProperty"
ERROR_PROPERTY_READ_ONLY: Final = "org.freedesktop.DBus.Error.PropertyReadOnly"

# polkit actions (polkit/io.github.Tproxyd.policy)
ACTION_TOGGLE: Final = "io.github.Tproxyd.toggle"
ACTION_CONFIGURE: Final = "io.github.Tproxyd.configure"

# Standard services we talk to.
DBUS_NAME: Final = "org.freedesktop.DBus"
DBUS_PATH: Final = "/org/freedesktop/DBus"
DBUS_IFACE: Final = "org.freedesktop.DBus"
PROPERTIES_IFACE: Final = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_IFACE: Final = "org.freedesktop.DBus.Introspectable"
PEER_IFACE: Final = "org.freedesktop.DBus.Peer"
OBJECT_MANAGER_IFACE: Final = "org.freedesktop.DBus.ObjectManager"  # not served
POLKIT_NAME: Final = "org.freedesktop.PolicyKit1"
POLKIT_PATH: Final = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE: Final = "org.freedesktop.PolicyKit1.Authority"
NM_NAME: Final = "org.freedesktop.NetworkManager"
NM_PATH: Final = "/org/freedesktop/NetworkManager"
NM_IFACE: Final = "org.freedesktop.NetworkManager"
NM_DEVICE_IFACE: Final = "org.freedesktop.NetworkManager.Device"
NM_ACTIVE_IFACE: Final = "org.freedesktop.NetworkManager.Connection.Active"
NM_SETTINGS_CONNECTION_IFACE: Final = "org.freedesktop.NetworkManager.Settings.Connection"
SYSTEMD_NAME: Final = "org.freedesktop.systemd1"
SYSTEMD_PATH: Final = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER_IFACE: Final = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT_IFACE: Final = "org.freedesktop.systemd1.Unit"
SYSTEMD_SERVICE_IFACE: Final = "org.freedesktop.systemd1.Service"
LOGIN1_NAME: Final = "org.freedesktop.login1"
LOGIN1_PATH: Final = "/org/freedesktop/login1"
LOGIN1_MANAGER_IFACE: Final = "org.freedesktop.login1.Manager"
