// SPDX-License-Identifier: GPL-2.0-or-later
//
// tproxyd's Quick Settings toggle (GNOME Shell 45 and later: ES modules).
//
// Everything shown comes from presentation.js (pure, unit-tested with gjs); this file only
// talks D-Bus and moves the result into Shell widgets:
//   - io.github.Tproxyd on the system bus through a Gio.DBusProxy, which follows the name's
//     owner and PropertiesChanged (DO_NOT_AUTO_START: a stopped tproxyd is shown as stopped);
//   - NetworkManager's devices (GetDevices -> Interface), when NetworkManager is on the bus;
//   - method calls carry ALLOW_INTERACTIVE_AUTHORIZATION, so polkit may ask for a password.
// Nothing happens before enable(), and disable() undoes everything (the bus watches, the
// proxy's signal handlers, pending calls, the widgets).

import Gio from 'gi://Gio';
import GLib from 'gi://GLib';
import GObject from 'gi://GObject';

import {Extension} from 'resource:///org/gnome/shell/extensions/extension.js';
import * as Main from 'resource:///org/gnome/shell/ui/main.js';
import * as PopupMenu from 'resource:///org/gnome/shell/ui/popupMenu.js';
import {QuickMenuToggle, SystemIndicator} from 'resource:///org/gnome/shell/ui/quickSettings.js';

import * as Presentation from './presentation.js';

const BUS_NAME = 'io.github.Tproxyd';
const OBJECT_PATH = '/io/github/Tproxyd';
const MANAGER_IFACE = 'io.github.Tproxyd.Manager1';
const NM_NAME = 'org.freedesktop.NetworkManager';
const NM_PATH = '/org/freedesktop/NetworkManager';
const NM_IFACE = 'org.freedesktop.NetworkManager';
const NM_DEVICE_IFACE = 'org.freedesktop.NetworkManager.Device';
const CALL_TIMEOUT_MS = 5 * 60 * 1000; // a person may be typing a password into polkit's dialog

// The part of dbus/io.github.Tproxyd.Manager1.xml the toggle uses.
const MANAGER_XML = `<node><interface name="${MANAGER_IFACE}">
  <method name="EnableLink"><arg name="ifname" type="s" direction="in"/><arg name="mode" type="s" direction="in"/></method>
  <method name="DisableLink"><arg name="ifname" type="s" direction="in"/></method>
  <method name="SetEnabled"><arg name="enabled" type="b" direction="in"/></method>
  <property name="Enabled" type="b" access="read"/>
  <property name="Links" type="a{ss}" access="read"/>
  <property name="ActiveLinks" type="as" access="read"/>
  <property name="State" type="s" access="read"/>
  <property name="CoreState" type="s" access="read"/>
  <property name="FailurePolicy" type="s" access="read"/>
  <property name="LastError" type="s" access="read"/>
  <property name="Version" type="s" access="read"/>
</interface></node>`;
const SIGNATURES = {EnableLink: '(ss)', DisableLink: '(s)', SetEnabled: '(b)'};

function isCancelled(e) {
    return e instanceof GLib.Error && e.matches(Gio.IOErrorEnum, Gio.IOErrorEnum.CANCELLED);
}

// Talks to tproxyd and NetworkManager; calls onChange(snapshot) on every change.
class Client {
    constructor(onChange, onError) {
        this._onChange = onChange;
        this._onError = onError;
        this._cancellable = new Gio.Cancellable();
        this._proxy = null;
        this._nmLinks = null;
        this._nmSignals = [];
        this._nmGeneration = 0;

        const info = Gio.DBusNodeInfo.new_for_xml(MANAGER_XML).interfaces[0];
        Gio.DBusProxy.new(Gio.DBus.system,
            Gio.DBusProxyFlags.DO_NOT_AUTO_START,
            info, BUS_NAME, OBJECT_PATH, MANAGER_IFACE,
            this._cancellable, (source, result) => {
                try {
                    this._proxy = Gio.DBusProxy.new_finish(result);
                } catch (e) {
                    if (!isCancelled(e))
                        console.error('tproxyd: cannot create the D-Bus proxy:', e.message);
                    return;
                }
                this._proxy.connectObject(
                    'g-properties-changed', () => this._changed(),
                    'notify::g-name-owner', () => this._changed(),
                    this);
                this._changed();
            });

        this._nmWatch = Gio.bus_watch_name_on_connection(Gio.DBus.system, NM_NAME,
            Gio.BusNameWatcherFlags.NONE,
            () => this._nmAppeared(), () => this._nmVanished());
    }

    snapshot() {
        const proxy = this._proxy;
        const running = Boolean(proxy && proxy.g_name_owner);
        let props = null;
        if (running) {
            props = {};
            for (const name of proxy.get_cached_property_names())
                props[name] = proxy.get_cached_property(name).deep_unpack();
            if (props.State === undefined)
                props = null; // owned, but GetAll has not answered yet
        }
        return {running: Boolean(props), props, nmLinks: this._nmLinks};
    }

    _changed() {
        this._onChange(this.snapshot());
    }

    // request: {method, args}, as in presentation.js's row actions
    call(request) {
        if (!this._proxy)
            return;
        this._proxy.call(request.method,
            new GLib.Variant(SIGNATURES[request.method], request.args),
            Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION, CALL_TIMEOUT_MS,
            this._cancellable, (proxy, result) => {
                try {
                    proxy.call_finish(result);
                } catch (e) {
                    if (isCancelled(e))
                        return;
                    const errorName = Gio.DBusError.is_remote_error(e)
                        ? Gio.DBusError.get_remote_error(e) : null;
                    Gio.DBusError.strip_remote_error(e);
                    this._onError(request, errorName, e.message);
                }
                this._changed(); // show the true state again
            });
    }

    // --- NetworkManager: the links it has now ---

    _nmAppeared() {
        const conn = Gio.DBus.system;
        const refresh = () => this.refreshNetworkManager();
        for (const member of ['DeviceAdded', 'DeviceRemoved']) {
            this._nmSignals.push(conn.signal_subscribe(NM_NAME, NM_IFACE, member, NM_PATH,
                null, Gio.DBusSignalFlags.NONE, refresh));
        }
        this.refreshNetworkManager();
    }

    _unsubscribeNetworkManager() {
        for (const id of this._nmSignals)
            Gio.DBus.system.signal_unsubscribe(id);
        this._nmSignals = [];
    }

    _nmVanished() {
        this._unsubscribeNetworkManager();
        this._nmGeneration++;
        if (this._nmLinks !== null) {
            this._nmLinks = null;
            this._changed();
        }
    }

    async _nmCall(path, iface, method, params, type) {
        const reply = await new Promise((resolve, reject) => {
            Gio.DBus.system.call(NM_NAME, path, iface, method, params,
                new GLib.VariantType(type), Gio.DBusCallFlags.NO_AUTO_START, 5000,
                this._cancellable, (conn, result) => {
                    try {
                        resolve(conn.call_finish(result));
                    } catch (e) {
                        reject(e);
                    }
                });
        });
        return reply.deep_unpack()[0];
    }

    async refreshNetworkManager() {
        if (this._nmSignals.length === 0)
            return; // NetworkManager is not on the bus
        const generation = ++this._nmGeneration;
        try {
            const paths = await this._nmCall(NM_PATH, NM_IFACE, 'GetDevices', null, '(ao)');
            const names = await Promise.all(paths.map(path => this._nmCall(path,
                'org.freedesktop.DBus.Properties', 'Get',
                new GLib.Variant('(ss)', [NM_DEVICE_IFACE, 'Interface']), '(v)')
                .then(v => v.deep_unpack(), () => '')));
            if (generation !== this._nmGeneration)
                return; // a newer refresh, NetworkManager's exit or disable() overtook this one
            this._nmLinks = names.filter(Boolean);
            this._changed();
        } catch (e) {
            if (!isCancelled(e))
                console.warn(`tproxyd: cannot list NetworkManager's devices: ${e.message}`);
        }
    }

    destroy() {
        this._cancellable.cancel();
        Gio.bus_unwatch_name(this._nmWatch);
        this._unsubscribeNetworkManager();
        this._nmGeneration++;
        this._proxy?.disconnectObject(this);
        this._proxy = null;
        this._onChange = () => {};
        this._onError = () => {};
    }
}

const TproxydToggle = GObject.registerClass(
class TproxydToggle extends QuickMenuToggle {
    _init(client) {
        super._init({
            title: Presentation.TITLE,
            iconName: Presentation.ICONS.off,
            toggleMode: false, // `checked` follows the daemon's Enabled, not the click
        });
        this.name = 'tproxyd-toggle';
        this._client = client;
        this._view = null;

        this._rows = new PopupMenu.PopupMenuSection();
        this.menu.addMenuItem(this._rows);

        this.connect('clicked', () => {
            if (!this._view?.sensitive)
                return;
            const enabled = !this.checked;
            this.checked = enabled; // at once; the daemon's answer (or an error) settles it
            this._client.call({method: 'SetEnabled', args: [enabled]});
        });
        this.menu.connect('open-state-changed', (menu, open) => {
            if (open)
                this._client.refreshNetworkManager();
        });
    }

    apply(view) {
        this._view = view;
        this.checked = view.checked;
        this.reactive = view.sensitive;
        // The shell binds the menu button's `reactive` to the toggle's: re-enable it, the menu
        // still explains why the toggle is off.
        this._menuButton.reactive = true;
        this.iconName = view.icon;
        this.title = view.title;
        this.subtitle = view.status;
        this.accessible_name = view.accessibleName;
        this.menu.setHeader(view.icon, view.headerTitle, view.headerSubtitle);

        this._rows.removeAll();
        for (const row of view.rows) {
            if (row.kind === 'link') {
                const item = new PopupMenu.PopupSwitchMenuItem(row.text, row.on);
                item.name = `tproxyd-link-${row.ifname}`;
                item.connect('toggled', () => this._client.call(row.action));
                this._rows.addMenuItem(item);
            } else {
                const item = new PopupMenu.PopupMenuItem(row.text, {reactive: false});
                item.name = 'tproxyd-note';
                this._rows.addMenuItem(item);
            }
        }
    }
});

const TproxydIndicator = GObject.registerClass(
class TproxydIndicator extends SystemIndicator {
    _init() {
        super._init();
        this.name = 'tproxyd-indicator';
        this._icon = this._addIndicator();
        this._icon.visible = false;

        this._client = new Client(
            snapshot => this._show(Presentation.present(snapshot)),
            (request, errorName, message) => {
                const {title, body} = Presentation.notificationFor(request, errorName, message);
                console.warn(`tproxyd: ${title}: ${body}`);
                Main.notify(title, body);
            });
        this._toggle = new TproxydToggle(this._client);
        this.quickSettingsItems.push(this._toggle);
        this._show(Presentation.present(this._client.snapshot()));
    }

    _show(view) {
        this._toggle.apply(view);
        this._icon.icon_name = view.indicator.icon;
        if (view.indicator.warning)
            this._icon.add_style_class_name('tproxyd-warning');
        else
            this._icon.remove_style_class_name('tproxyd-warning');
        this._icon.visible = view.indicator.visible;
    }

    destroy() {
        this._client.destroy();
        this.quickSettingsItems.forEach(item => item.destroy());
        this.quickSettingsItems = [];
        super.destroy();
    }
});

export default class TproxydExtension extends Extension {
    enable() {
        this._indicator = new TproxydIndicator();
        Main.panel.statusArea.quickSettings.addExternalIndicator(this._indicator);
    }

    disable() {
        this._indicator?.destroy();
        this._indicator = null;
    }
}
