"""Supervising the proxy core (v2ray/xray) through systemd: its config, its unit, its readiness.
Not the domain core: that is model.py, desired.py and engine.py."""
