# The two commands of the README:
#   make demo   — a demo mesh on this machine (controller + nodes), identities shown working
#   make test   — install what the tests need and run them all (unit, integration, e2e)
# Both work on a fresh Debian 12 machine as root.

VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv openssl wireguard-go wireguard-tools nftables iproute2 iputils-ping iperf3 procps kmod \
	openssh-server systemd coturn faketime postgresql-15
# The test OpenID provider (tests/oidc, panva's oidc-provider) runs on Node.js >= 20. The machine image has
# Node.js 20 and npm (NodeSource's nodejs package); only where there is no node at all are Debian's taken
# (Debian 12's nodejs is 18: too old for oidc-provider 9, the oidc tests then say so).
OIDC_NODE_MODULES := tests/oidc/node_modules/.stamp

.PHONY: deps venv test unit demo bench lint clean

deps: .deps-stamp $(OIDC_NODE_MODULES)
.deps-stamp:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null
	touch $@

# Exactly the versions of tests/oidc/package-lock.json (npm ci), never newer ones.
$(OIDC_NODE_MODULES): tests/oidc/package.json tests/oidc/package-lock.json | .deps-stamp
	command -v node >/dev/null && command -v npm >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; }
	npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error
	touch $@

venv: $(VENV)/.stamp
# editable_mode=compat: a plain path in a .pth file. The default editable mode imports a finder (pathlib,
# fnmatch, ...) at every interpreter start, ~15 ms on each meshctl command that a wheel install never pays.
$(VENV)/.stamp: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

test: deps venv
	$(PY) -m pytest -q tests

unit: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check meshcore controller meshd idmesh meshctl deploy tests bench demo
	$(VENV)/bin/mypy

demo: deps venv
	$(PY) -m demo $(DEMO_ARGS)

bench: venv
	$(PY) bench/bench_identity.py
	$(PY) bench/bench_enroll.py

clean:
	rm -rf $(VENV) .deps-stamp tests/oidc/node_modules
