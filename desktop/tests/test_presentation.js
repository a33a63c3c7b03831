// SPDX-License-Identifier: GPL-2.0-or-later
//
// gjs unit tests of the extensions' pure module (presentation.js): no Shell, no bus.
//   gjs -m desktop/tests/test_presentation.js LEGACY_DIR   run the tests
//   gjs -m desktop/tests/test_presentation.js --print      print the table with present()'s output
//                                                          (to review a wording change, then save it)
// Both forms of the module are tested: the ES module (the source, GNOME 45+) and the legacy
// `imports` copy generated from it for GNOME 43/44 into LEGACY_DIR, by
// `python3 desktop/gnome-shell/make_legacy.py LEGACY_DIR`.
// The same table (presentation_cases.json) is checked against the Python port by
// tests/desktop/test_presentation.py, so every front end speaks with the same words.
/* eslint-disable no-restricted-globals */

import GLib from 'gi://GLib';
import System from 'system';

import * as ES from '../gnome-shell/45/tproxyd@tproxyd.github.io/presentation.js';

const HERE = GLib.path_get_dirname(GLib.filename_from_uri(import.meta.url)[0]);

const STATES = ['off', 'starting', 'active', 'degraded', 'blocked', 'failed'];

function readJson(path) {
    const [, bytes] = GLib.file_get_contents(path);
    return JSON.parse(new TextDecoder().decode(bytes));
}

// JSON with sorted keys: key order must not matter, everything else must.
function canonical(value) {
    if (Array.isArray(value))
        return `[${value.map(canonical).join(',')}]`;
    if (value && typeof value === 'object')
        return `{${Object.keys(value).sort().map(k => `${JSON.stringify(k)}:${canonical(value[k])}`).join(',')}}`;
    return JSON.stringify(value);
}

const table = readJson(GLib.build_filenamev([HERE, 'presentation_cases.json']));

if (ARGV.includes('--print')) {
    for (const c of table.present)
        c.expect = ES.present(c.snapshot);
    for (const c of table.notifications)
        c.expect = ES.notificationFor(c.request, c.error, c.message);
    print(JSON.stringify(table, null, 2));
    System.exit(0);
}

if (ARGV.length !== 1) {
    printerr('usage: gjs -m test_presentation.js LEGACY_DIR (written by desktop/gnome-shell/make_legacy.py)');
    System.exit(2);
}
imports.searchPath.unshift(ARGV[0]);
const LEGACY = imports.presentation;

let passed = 0, failed = 0;
let kind = ''; // the module under test: 'es' or 'legacy'
function check(name, ok, detail = '') {
    name = `${kind}: ${name}`;
    if (ok) {
        passed++;
        print(`ok ${name}`);
    } else {
        failed++;
        print(`FAIL ${name}${detail ? `\n  ${detail}` : ''}`);
    }
}
function equal(name, got, want) {
    check(name, canonical(got) === canonical(want), `got  ${canonical(got)}\n  want ${canonical(want)}`);
}

for (const [k, P] of [['es', ES], ['legacy', LEGACY]]) {
    kind = k;
    // 1. The shared table: present() and notificationFor() give exactly the recorded output.
    for (const c of table.present)
        equal(`present: ${c.name}`, P.present(c.snapshot), c.expect);
    for (const c of table.notifications)
        equal(`notification: ${c.name}`, P.notificationFor(c.request, c.error, c.message), c.expect);

    // 2. The table covers what the issue asks for.
    const running = table.present.filter(c => c.snapshot.running && c.snapshot.props);
    for (const state of STATES)
        check(`table covers State=${state}`, running.some(c => c.snapshot.props.State === state));
    check('table covers the service absent', table.present.some(c => !c.snapshot.running));
    check('table covers no links', running.some(c => Object.keys(c.snapshot.props.Links).length === 0));
    check('table covers many links', running.some(c => Object.keys(c.snapshot.props.Links).length >= 10 &&
        (c.snapshot.nmLinks || []).length > P.MAX_OTHER_LINKS));

    // 3. The words the issue names, independent of the recorded table.
    function props(over) {
        return {Enabled: true, Links: {wlan0: 'host'}, ActiveLinks: ['wlan0'], State: 'active',
            CoreState: 'active', FailurePolicy: 'open', LastError: '', Version: '0.1.0', ...over};
    }
    function view(over, nmLinks = null) {
        return P.present({running: true, props: props(over), nmLinks});
    }
    equal('active on wlan0', view({}).status, 'active on wlan0');
    equal('degraded in words', view({State: 'degraded', ActiveLinks: []}).status, 'core down: traffic direct');
    equal('blocked in words', view({State: 'blocked'}).status, 'blocked: core down');
    equal('failed says LastError', view({State: 'failed', LastError: 'nft said no'}).status, 'failed: nft said no');
    equal('label and header agree', view({State: 'degraded'}).headerSubtitle, view({State: 'degraded'}).status);
    const absent = P.present({running: false, props: null, nmLinks: ['eth0']});
    equal('absent: words', absent.status, 'tproxyd is not running');
    equal('absent: insensitive, unchecked, no top-bar icon',
        [absent.sensitive, absent.checked, absent.indicator.visible], [false, false, false]);
    equal('stale properties do not count while the name has no owner',
        P.present({running: false, props: props({}), nmLinks: null}).status, 'tproxyd is not running');
    equal('checked follows Enabled, not State', [view({Enabled: false, State: 'active'}).checked,
        view({Enabled: true, State: 'off'}).checked], [false, true]);
    for (const state of STATES) {
        const v = view({State: state});
        const warn = ['degraded', 'blocked', 'failed'].includes(state);
        equal(`top-bar icon for ${state}`, [v.indicator.visible, v.indicator.warning],
            [state !== 'off', warn]);
        check(`icon for ${state} is a theme name`, /^network-vpn(-[a-z]+)*-symbolic$/.test(v.icon));
    }
    check('warning states share one icon, distinct from active',
        view({State: 'degraded'}).icon === view({State: 'failed'}).icon &&
        view({State: 'degraded'}).icon !== view({}).icon);
    const nm = view({Links: {wlan0: 'host', usb0: ''}}, ['lo', 'eth0', 'wlan0', 'eth0', 'usb0']);
    equal('configured links first (sorted, mode in words), then NM links not configured, lo skipped',
        nm.rows.map(r => [r.ifname, r.on, r.text]),
        [['usb0', true, 'usb0 · auto · not present'], ['wlan0', true, 'wlan0 · host · proxied'],
            ['eth0', false, 'eth0 · not proxied']]);
    equal('one click on an NM link enables it in auto mode', nm.rows[2].action,
        {method: 'EnableLink', args: ['eth0', '']});
    equal('a configured link switches off with DisableLink', nm.rows[1].action,
        {method: 'DisableLink', args: ['wlan0']});
    equal('ifnames that are Object.prototype members are names like any other',
        view({Links: {constructor: 'lan'}, ActiveLinks: []}, ['toString', 'constructor']).rows.map(r => r.ifname),
        ['constructor', 'toString']);
    equal('AccessDenied notification', P.notificationFor({method: 'SetEnabled', args: [true]},
        'org.freedesktop.DBus.Error.AccessDenied', 'not authorized to toggle tproxyd (polkit)'),
    {title: 'Could not turn the proxy on', body: 'not authorized to toggle tproxyd (polkit)'});
}

print(`${passed} passed, ${failed} failed`);
System.exit(failed === 0 ? 0 : 1);
