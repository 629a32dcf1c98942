# The two commands of the README:
#   make demo   — a demo mesh on this machine (controller + nodes), identities shown working
#   make test   — install what the tests need and run them all (unit, integration, e2e)
# Both work on a fresh Debian 12 machine as root.

VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv openssl wireguard-go wireguard-tools nftables iproute2 iputils-ping iperf3 procps kmod \
	openssh-server systemd

.PHONY: deps venv test unit demo bench lint clean

deps: .deps-stamp
.deps-stamp:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null
	touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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
	rm -rf $(VENV) .deps-stamp
