"""tproxyd-toggle: the desktop toggle for desktops other than GNOME Shell (a StatusNotifierItem
tray entry, or a GTK 4 / libadwaita window), speaking the same words as the GNOME Shell
extension (desktop/gnome-shell/): `presentation` is a port of the extension's pure module."""
