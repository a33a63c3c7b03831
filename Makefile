# tproxyd developer tasks. `make deps` is idempotent; `make test` is what CI runs.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := nftables libnftables1 python3-nftables python3-jsonschema python3-venv python3-systemd python3-dbus \
	v2ray iproute2 iputils-ping iperf3 socat curl conntrack tcpdump procps \
	dbus-daemon dbus-bin polkitd pkexec systemd debootstrap systemd-container network-manager dnsmasq-base udhcpc \
	libdbus-1-dev libglib2.0-dev libsystemd-dev pkg-config gcc python3-dev \
	gnome-shell gnome-shell-extension-appindicator gjs xvfb xdotool imagemagick python3-gi gir1.2-gtk-4.0 gir1.2-adw-1 \
	firewalld ufw iptables docker.io

.PHONY: deps check lint typecheck unit e2e test bench demo clean install uninstall purge lock

deps: $(VENV)/.deps-stamp

# Debian's python (not a pyenv build under /root) so unprivileged users can run .venv/bin/tproxyctl;
# --system-site-packages for Debian's python3-nftables (libnftables binding).
$(VENV)/.deps-stamp: pyproject.toml Makefile requirements/test.txt
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@echo "deps: installing tproxyd into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements/test.txt
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@chmod -R a+rX $(VENV)
	@# Tests run .venv/bin/tproxyctl as unprivileged users: every directory above the checkout must
	@# be traversable by them. Where one is not (a 0700 parent), allow traversal (o+x) only.
	@if ! setpriv --reuid=nobody --regid=nogroup --clear-groups test -x $(PY) 2>/dev/null; then \
		d=$(CURDIR); while [ "$$d" != / ]; do \
			if [ "$$(stat -c %A "$$d" | cut -c10)" != x ] && [ "$$(stat -c %A "$$d" | cut -c10)" != t ]; then \
				echo "deps: making $$d traversable (o+x) so test users can run .venv"; chmod o+x "$$d"; fi; \
			d=$$(dirname "$$d"); done; \
	fi
	@touch $@

lint: deps
	$(VENV)/bin/ruff check tproxy_service tests bench demo desktop
	$(VENV)/bin/ruff format --check tproxy_service tests bench demo desktop

typecheck: deps
	$(VENV)/bin/mypy

unit: deps
	$(PY) -m pytest -q tests/unit

check: lint typecheck unit

e2e: deps
	$(PY) -m pytest -q tests/e2e

# Everything CI runs: static checks and every test tier. TPROXYD_REQUIRE_ALL=1 turns a missing
# prerequisite (which may skip on a laptop) into a failure.
test: deps lint typecheck
	TPROXYD_REQUIRE_ALL=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: deps
	$(PY) bench/run_all.py

demo: deps
	$(PY) demo/run_demo.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# --- pinned Python dependencies ------------------------------------------------------------------
# Every distribution pip installs is pinned with the hashes of all its files (every Python
# version and platform, and the sdist), so Debian 12's Python 3.11 and Debian 13's 3.13 install
# the same reviewed releases, and pip runs in hash-checking mode: nothing PyPI serves on the day
# of an install runs as root unless it is byte-identical to what was locked. The lock is a
# requirements file because pip (23.0 here) checks hashes only there: hashes in a constraints
# file are not enforced. requirements/runtime.txt is what `make install` puts in the service's
# venv; requirements/test.txt adds the test tools for `make deps`. Debian provides
# systemd-python (python3-systemd) and dbus-python (python3-dbus), hence not in the locks.
# After changing a dependency in pyproject.toml or requirements/build.in, run `make lock` and
# review the diff (it needs PyPI; uv runs from a throw-away venv).
UV_VERSION := 0.13.8
LOCK_ARGS := --universal --python-version 3.11 --generate-hashes --custom-compile-command 'make lock' \
	--no-emit-package systemd-python --no-emit-package dbus-python
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	/usr/bin/python3 -m venv "$$tmp/venv" && "$$tmp/venv/bin/pip" install -q --disable-pip-version-check uv==$(UV_VERSION) && \
	UV_CACHE_DIR="$$tmp/cache" "$$tmp/venv/bin/uv" pip compile -q $(LOCK_ARGS) pyproject.toml requirements/build.in \
		-o requirements/runtime.txt && \
	UV_CACHE_DIR="$$tmp/cache" "$$tmp/venv/bin/uv" pip compile -q $(LOCK_ARGS) --extra test pyproject.toml requirements/build.in \
		-c requirements/runtime.txt -o requirements/test.txt

# --- install (Debian 12 and 13) ------------------------------------------------------------------
# The package lives in its own venv under $(PREFIX)/lib/tproxyd, made from Debian's python (3.11 on
# Debian 12, 3.13 on 13) with --system-site-packages: Debian ships pyroute2 0.7 (12: 0.7.2, 13:
# 0.7.7) and an older dbus-fast, tproxyd needs pyroute2 >= 0.9 (AsyncIPRoute) and a current
# dbus-fast from PyPI, while libnftables' binding (python3-nftables) and python3-systemd come
# from Debian. Everyone can run /usr/bin/tproxyctl (the venv is world-readable).
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=
# Extra pip options for the install, e.g. an offline wheelhouse: PIP_ARGS="--no-index --find-links DIR"
# (fill DIR with `pip download --require-hashes -r requirements/runtime.txt -d DIR`, adding
# `--python-version 3.13 --only-binary=:all:` for a Debian 13 target).
PIP_ARGS ?=
LIBDIR := $(DESTDIR)$(PREFIX)/lib/tproxyd
RUNTIME_PACKAGES := nftables libnftables1 python3-nftables python3-venv python3-systemd python3-gi v2ray dbus polkitd
SYSTEMD_UNITDIR := $(DESTDIR)/lib/systemd/system
DBUS_SYSTEMD := $(DESTDIR)$(PREFIX)/share/dbus-1/system.d
DBUS_SERVICES := $(DESTDIR)$(PREFIX)/share/dbus-1/system-services
POLKIT_ACTIONS := $(DESTDIR)$(PREFIX)/share/polkit-1/actions
DOCDIR := $(DESTDIR)$(PREFIX)/share/doc/tproxyd
NM_DISPATCHER := $(DESTDIR)$(PREFIX)/lib/NetworkManager/dispatcher.d
CONFDIR := $(DESTDIR)$(SYSCONFDIR)/tproxyd
# The unit's StateDirectory=: the saved choices (state.json).
STATEDIR := $(DESTDIR)/var/lib/tproxyd
EXT_UUID := tproxyd@tproxyd.github.io
GNOME_EXT := $(DESTDIR)$(PREFIX)/share/gnome-shell/extensions/$(EXT_UUID)
# Which extension: 43 (legacy imports: GNOME 43, 44; written by desktop/gnome-shell/make_legacy.py)
# or 45 (ES modules: 45 and later, also where gnome-shell is not installed). Override: make install GNOME_SHELL_EXT=43.
GNOME_SHELL_EXT ?= $(shell gnome-shell --version 2>/dev/null | awk '{print ($$3 + 0 > 0 && $$3 + 0 < 45) ? 43 : 45}' | grep . || echo 45)
EXT_FILES := metadata.json extension.js client.js presentation.js toggle.js stylesheet.css
# What `make install` puts down, relative to DESTDIR (used by uninstall and the system test).
INSTALLED_FILES := $(PREFIX)/bin/tproxyd $(PREFIX)/bin/tproxyctl \
	/lib/systemd/system/tproxyd.service /lib/systemd/system/tproxyd-core.service \
	$(PREFIX)/share/dbus-1/system.d/io.github.Tproxyd.conf \
	$(PREFIX)/share/dbus-1/system-services/io.github.Tproxyd.service \
	$(PREFIX)/share/polkit-1/actions/io.github.Tproxyd.policy \
	$(PREFIX)/share/doc/tproxyd/50-tproxyd.rules.example \
	$(PREFIX)/share/doc/tproxyd/io.github.Tproxyd.Manager1.xml \
	$(PREFIX)/bin/tproxyd-toggle $(PREFIX)/share/applications/tproxyd-toggle.desktop \
	$(PREFIX)/lib/NetworkManager/dispatcher.d/90-tproxyd \
	$(addprefix $(PREFIX)/share/gnome-shell/extensions/$(EXT_UUID)/,$(EXT_FILES))

install:
	@missing=$$(for p in $(RUNTIME_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ] && [ -z "$(DESTDIR)" ]; then \
		echo "install: installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@echo "install: tproxyd into $(LIBDIR)"
	@test -x $(LIBDIR)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(LIBDIR)
	@$(LIBDIR)/bin/python -m pip install -q --disable-pip-version-check $(PIP_ARGS) --require-hashes -r requirements/runtime.txt
	@$(LIBDIR)/bin/python -m pip install -q --disable-pip-version-check $(PIP_ARGS) --no-deps --no-build-isolation --upgrade .
	@rm -rf build tproxyd.egg-info
	@chmod -R a+rX $(LIBDIR)
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sf $(PREFIX)/lib/tproxyd/bin/tproxyd $(DESTDIR)$(PREFIX)/bin/tproxyd
	ln -sf $(PREFIX)/lib/tproxyd/bin/tproxyctl $(DESTDIR)$(PREFIX)/bin/tproxyctl
	ln -sf $(PREFIX)/lib/tproxyd/bin/tproxyd-toggle $(DESTDIR)$(PREFIX)/bin/tproxyd-toggle
	install -d $(GNOME_EXT)
	# The 43/44 extension's modules are generated from the 45+ ES modules (desktop/README.md).
	$(if $(filter 43,$(GNOME_SHELL_EXT)),/usr/bin/python3 desktop/gnome-shell/make_legacy.py $(GNOME_EXT),install -m 0644 $(addprefix desktop/gnome-shell/45/$(EXT_UUID)/,$(EXT_FILES)) $(GNOME_EXT)/)
	# NetworkManager refuses dispatcher scripts that are not root-owned or are group/world-writable.
	install -D -o root -g root -m 0755 nm-dispatcher/90-tproxyd $(NM_DISPATCHER)/90-tproxyd
	install -D -m 0644 desktop/tproxyd-toggle.desktop $(DESTDIR)$(PREFIX)/share/applications/tproxyd-toggle.desktop
	install -D -m 0644 systemd/tproxyd.service $(SYSTEMD_UNITDIR)/tproxyd.service
	install -D -m 0644 systemd/tproxyd-core.service $(SYSTEMD_UNITDIR)/tproxyd-core.service
	install -D -m 0644 dbus/io.github.Tproxyd.conf $(DBUS_SYSTEMD)/io.github.Tproxyd.conf
	install -D -m 0644 dbus/io.github.Tproxyd.service $(DBUS_SERVICES)/io.github.Tproxyd.service
	install -D -m 0644 polkit/io.github.Tproxyd.policy $(POLKIT_ACTIONS)/io.github.Tproxyd.policy
	install -D -m 0644 polkit/50-tproxyd.rules.example $(DOCDIR)/50-tproxyd.rules.example
	install -D -m 0644 dbus/io.github.Tproxyd.Manager1.xml $(DOCDIR)/io.github.Tproxyd.Manager1.xml
	@if [ -e $(CONFDIR)/config.toml ]; then echo "install: keeping $(CONFDIR)/config.toml"; \
	else install -D -m 0644 etc/config.toml $(CONFDIR)/config.toml; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "install: done. Try: tproxyctl status"

# Removes the program (everything install put down), as Debian's `apt remove` does: the saved
# choices (/var/lib/tproxyd), the core's file logs (/var/log/tproxyd) and a config you changed
# stay, so a later install carries on where this one stopped. `make purge` removes them too.
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl stop tproxyd.service tproxyd-core.service 2>/dev/null || true; \
		systemctl disable tproxyd.service 2>/dev/null || true; fi
	@# failure_policy = closed keeps blocking the proxied links after a stop (a kill switch): release them.
	@if [ -z "$(DESTDIR)" ] && [ -x $(LIBDIR)/bin/tproxyd ]; then \
		$(LIBDIR)/bin/tproxyd --release --config $(CONFDIR)/config.toml || $(LIBDIR)/bin/tproxyd --release --config /dev/null; fi
	rm -f $(addprefix $(DESTDIR),$(INSTALLED_FILES))
	-rmdir $(DOCDIR) $(GNOME_EXT) 2>/dev/null
	rm -rf $(LIBDIR)
	@if [ -e $(CONFDIR)/config.toml ] && cmp -s etc/config.toml $(CONFDIR)/config.toml; then \
		rm -f $(CONFDIR)/config.toml; rmdir $(CONFDIR) 2>/dev/null || true; \
	elif [ -e $(CONFDIR)/config.toml ]; then echo "uninstall: keeping your edited $(CONFDIR)/config.toml"; fi
	rm -rf $(DESTDIR)/run/tproxyd
	-rmdir $(DESTDIR)/var/log/tproxyd 2>/dev/null  # the core's LogsDirectory, if it holds nothing
	rm -rf $(STATEDIR)/lists  # parsed bypass lists kept across restarts: a cache, not a choice
	@if [ -d $(STATEDIR) ]; then echo "uninstall: keeping the saved choices in $(STATEDIR) (make purge removes them)"; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# uninstall, then everything tproxyd kept: saved choices, file logs and the config (edited or not),
# as Debian's `apt purge` does. Files of your own in $(CONFDIR) stay, and so does the directory.
purge: uninstall
	rm -rf $(STATEDIR) $(DESTDIR)/var/log/tproxyd
	rm -f $(CONFDIR)/config.toml
	@if [ -d $(CONFDIR) ] && ! rmdir $(CONFDIR) 2>/dev/null; then \
		echo "purge: keeping $(CONFDIR): it holds files tproxyd did not install"; fi
