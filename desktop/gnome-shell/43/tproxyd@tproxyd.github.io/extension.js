// SPDX-License-Identifier: GPL-2.0-or-later
//
// tproxyd's Quick Settings toggle, GNOME Shell 43 and 44 (legacy `imports`): the entry point.
// client.js, presentation.js and toggle.js are generated from the GNOME 45+ extension's ES
// modules (desktop/gnome-shell/make_legacy.py): only this file is the 43/44 extension's own.
/* exported init */

const Main = imports.ui.main;
const Me = imports.misc.extensionUtils.getCurrentExtension();
const {TproxydIndicator} = Me.imports.toggle;

class Extension {
    enable() {
        this._indicator = new TproxydIndicator();
        const quickSettings = Main.panel.statusArea.quickSettings;
        // GNOME 43/44 have no public API for this (45 has addExternalIndicator).
        quickSettings._indicators.insert_child_at_index(this._indicator, 0);
        // GNOME 43's toggles have one line (no subtitle): span both columns so that the state
        // in words fits; 44's title + subtitle fit in one.
        const span = this._indicator.hasSubtitle ? 1 : 2;
        quickSettings._addItems(this._indicator.quickSettingsItems, span);
    }

    disable() {
        this._indicator?.destroy();
        this._indicator = null;
    }
}

/** @returns {Extension} */
function init() {
    return new Extension();
}
