// SPDX-License-Identifier: GPL-2.0-or-later
//
// tproxyd's state -> what the toggle shows. PURE: no Shell, GLib or Gio imports, so `gjs -m`
// runs it standalone (desktop/tests/test_presentation.js) and the GNOME Shell 45+ extension
// imports it as an ES module.
//
// This file is the one source: the GNOME 43/44 extension's copy (legacy `imports` style) is
// generated from it at build time by `python3 desktop/gnome-shell/make_legacy.py DIR` (make
// install, the tests). Only `export const` and `export function` may export: the generator turns them into
// `var` and `function`, which legacy `imports` exports.
//
// The Python fallback (tproxy_service/toggle/presentation.py) is a line-by-line port; both are
// checked against the same table of cases (desktop/tests/presentation_cases.json), so the
// wording is the same everywhere. Change both, then the table.
//
// A snapshot is what the extension knows:
//   {running: bool,                 is io.github.Tproxyd owned on the system bus?
//    props: {Enabled, Links, ActiveLinks, State, LastError, ...} | null,
//    nmLinks: [ifname, ...] | null}  NetworkManager's devices; null when NM is not on the bus

export const TITLE = 'Proxy';
export const HEADER_TITLE = 'Transparent proxy';
export const MAX_OTHER_LINKS = 8; // NetworkManager links offered in the menu, at most

export const ICONS = {
    active: 'network-vpn-symbolic',
    off: 'network-vpn-disabled-symbolic',
    starting: 'network-vpn-acquiring-symbolic',
    warning: 'network-vpn-no-route-symbolic',
};

const NOT_RUNNING = 'tproxyd is not running';
const WARNING_STATES = ['degraded', 'blocked', 'failed'];

/**
 * @param {string} mode a Links value: 'host', 'lan', 'both' or '' (auto)
 * @returns {string} the mode in words
 */
export function modeText(mode) {
    return mode === '' ? 'auto' : mode;
}

/**
 * 'a', 'a and b', 'a, b and 3 more'
 *
 * @param {string[]} names sorted names, at least one
 * @returns {string}
 */
function _listNames(names) {
    if (names.length === 1)
        return names[0];
    if (names.length === 2)
        return `${names[0]} and ${names[1]}`;
    return `${names[0]}, ${names[1]} and ${names.length - 2} more`;
}

function _cmp(a, b) {
    return a < b ? -1 : a > b ? 1 : 0;
}

// Natural order: eth2 before eth10. Names are split into text and number runs (text first,
// so runs of the same kind are compared); equal keys fall back to the plain names.
function _naturalKey(name) {
    return name.split(/([0-9]+)/).map((run, i) => (i % 2 ? Number(run) : run));
}

function _sorted(names) {
    return [...names].sort((a, b) => {
        const ka = _naturalKey(a), kb = _naturalKey(b);
        for (let i = 0; i < Math.min(ka.length, kb.length); i++) {
            const c = _cmp(ka[i], kb[i]);
            if (c !== 0)
                return c;
        }
        return _cmp(ka.length, kb.length) || _cmp(a, b);
    });
}

/**
 * The state in words: the GNOME 43 toggle's label, the menu header's subtitle, the tray's
 * tooltip and the fallback window's subtitle.
 *
 * @param {object} props the daemon's properties
 * @returns {string}
 */
export function statusText(props) {
    const state = props.State;
    if (state === 'off')
        return 'proxy off';
    if (state === 'starting')
        return 'starting';
    if (state === 'degraded')
        return 'core down: traffic direct';
    if (state === 'blocked')
        return 'blocked: core down';
    if (state === 'failed')
        return props.LastError ? `failed: ${props.LastError}` : 'failed';
    if (state === 'active') {
        const active = _sorted(props.ActiveLinks || []);
        if (active.length > 0)
            return `active on ${_listNames(active)}`;
        const configured = _sorted(Object.keys(props.Links || {}));
        if (configured.length === 0)
            return 'active: no link chosen';
        if (configured.length > 2)
            return `active: waiting for ${configured.length} links`;
        return `active: waiting for ${_listNames(configured)}`;
    }
    return state || 'unknown';
}

function _icon(running, props) {
    if (!running || !props || props.State === 'off')
        return ICONS.off;
    if (props.State === 'starting')
        return ICONS.starting;
    if (WARNING_STATES.includes(props.State))
        return ICONS.warning;
    return ICONS.active;
}

function _linkRows(props, nmLinks) {
    const links = props.Links || {};
    const active = props.ActiveLinks || [];
    const rows = [];
    for (const ifname of _sorted(Object.keys(links))) {
        let text = `${ifname} · ${modeText(links[ifname])}`;
        if (props.State === 'active')
            text += active.includes(ifname) ? ' · proxied' : ' · not present';
        rows.push({
            kind: 'link', ifname, text, on: true,
            action: {method: 'DisableLink', args: [ifname]},
        });
    }
    if (nmLinks) {
        const others = _sorted(nmLinks.filter((n, i) =>
            n && n !== 'lo' && !Object.prototype.hasOwnProperty.call(links, n) &&
            nmLinks.indexOf(n) === i));
        for (const ifname of others.slice(0, MAX_OTHER_LINKS)) {
            rows.push({
                kind: 'link', ifname, text: `${ifname} · not proxied`, on: false,
                action: {method: 'EnableLink', args: [ifname, '']},
            });
        }
        if (others.length > MAX_OTHER_LINKS) {
            const more = others.length - MAX_OTHER_LINKS;
            rows.push({kind: 'note', text: `${more} more: tproxyctl enable IFNAME`});
        }
    }
    if (rows.length === 0)
        rows.push({kind: 'note', text: 'No links chosen: tproxyctl enable IFNAME'});
    return rows;
}

/**
 * Everything the toggle, the top-bar icon and the menu show for one snapshot.
 *
 * @param {object} snapshot see the top of this file
 * @returns {object} {sensitive, checked, title, status, icon, accessibleName, headerTitle,
 *   headerSubtitle, indicator: {visible, icon, warning}, rows: [...]}
 */
export function present(snapshot) {
    const props = snapshot.running ? snapshot.props : null;
    const running = Boolean(props);
    const status = running ? statusText(props) : NOT_RUNNING;
    const icon = _icon(running, props);
    const proxying = running && Boolean(props.Enabled) && props.State !== 'off';
    return {
        sensitive: running,
        checked: running && Boolean(props.Enabled),
        title: TITLE,
        status,
        icon,
        accessibleName: `${HEADER_TITLE}: ${status}`,
        headerTitle: HEADER_TITLE,
        headerSubtitle: status,
        indicator: {
            visible: proxying,
            icon,
            warning: proxying && WARNING_STATES.includes(props.State),
        },
        rows: running
            ? _linkRows(props, snapshot.nmLinks)
            : [{kind: 'note', text: 'Start it with: systemctl start tproxyd'}],
    };
}

/**
 * The short notification for a call that failed.
 *
 * @param {object} request {method, args} as in a row's action, or SetEnabled's
 * @param {string|null} errorName the D-Bus error name (null: not a D-Bus error)
 * @param {string} message the error's message, without the remote error prefix
 * @returns {object} {title, body}
 */
export function notificationFor(request, errorName, message) {
    const {method, args} = request;
    let title;
    if (method === 'SetEnabled')
        title = `Could not turn the proxy ${args[0] ? 'on' : 'off'}`;
    else if (method === 'EnableLink')
        title = `Could not proxy ${args[0]}`;
    else if (method === 'DisableLink')
        title = `Could not stop proxying ${args[0]}`;
    else
        title = `${method} failed`;
    let body = message || errorName || 'unknown error';
    if (errorName === 'org.freedesktop.DBus.Error.ServiceUnknown' ||
        errorName === 'org.freedesktop.DBus.Error.NameHasNoOwner')
        body = NOT_RUNNING;
    else if (errorName === 'org.freedesktop.DBus.Error.AccessDenied' && !message)
        body = 'not authorized (polkit)';
    return {title, body};
}
