# tproxyd developer tasks. `make deps` is idempotent; `make test` is what CI runs.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := nftables libnftables1 python3-nftables python3-jsonschema python3-venv python3-systemd \
	v2ray iproute2 iputils-ping iperf3 socat curl conntrack tcpdump procps \
	dbus-daemon dbus-bin polkitd pkexec systemd \
	libdbus-1-dev libglib2.0-dev libsystemd-dev pkg-config gcc python3-dev

.PHONY: deps check lint typecheck unit e2e test bench demo clean

deps: $(VENV)/.deps-stamp

# Debian's python (not a pyenv build under /root) so unprivileged users can run .venv/bin/tproxyctl;
# --system-site-packages for Debian's python3-nftables (libnftables binding).
$(VENV)/.deps-stamp: pyproject.toml Makefile
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@echo "deps: installing tproxyd into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@chmod -R a+rX $(VENV)
	@touch $@

lint: deps
	$(VENV)/bin/ruff check tproxy_service tests bench
	$(VENV)/bin/ruff format --check tproxy_service tests bench

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

demo:
	@echo "make demo arrives with the install/demo issue; see README.md" >&2; exit 2

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
