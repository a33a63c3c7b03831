// SPDX-License-Identifier: GPL-2.0-or-later
//
// tproxyd's Quick Settings toggle, GNOME Shell 45 and later (ES modules): the entry point.
// client.js talks D-Bus, presentation.js decides what is shown, toggle.js shows it. Nothing
// happens before enable(); disable() destroys the indicator, which undoes everything (the
// bus watches, the proxy's signal handlers, pending calls, the widgets).

import {Extension} from 'resource:///org/gnome/shell/extensions/extension.js';
import * as Main from 'resource:///org/gnome/shell/ui/main.js';

import {TproxydIndicator} from './toggle.js';

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
