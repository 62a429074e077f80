# The README's commands. They set up what a fresh Debian 12 machine lacks, once:
# apt packages when missing (as root), and a virtualenv in .venv/ that is reinstalled only
# when pyproject.toml or constraints.txt change.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
STREAM_MODULE := /usr/lib/nginx/modules/ngx_stream_module.so
NGINX_PACKAGES := nginx libnginx-mod-stream
# The first python3 >= 3.11 that can make a virtualenv (Debian's needs python3-venv for that).
FIND_PYTHON := for p in python3 python3.13 python3.12 python3.11; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && { echo $$p; break; }; done
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends
IMAGE ?= proxyctl:0.1.0

.PHONY: deps system-deps promtool test demo bench schema image fresh-debian-check

deps: system-deps $(INSTALLED)

# nginx with the stream module, Python with venv when no usable one is on PATH, openssl
# (tests make the test API server's TLS certificate with it), and node with npm (the rollout
# tests install and run the statsd daemon from npm).
system-deps:
	@missing=""; \
	if ! command -v nginx >/dev/null 2>&1 || ! [ -e $(STREAM_MODULE) ]; then missing="$$missing $(NGINX_PACKAGES)"; fi; \
	if [ -z "$$($(FIND_PYTHON))" ]; then missing="$$missing python3 python3-venv"; fi; \
	if ! command -v openssl >/dev/null 2>&1; then missing="$$missing openssl"; fi; \
	if ! command -v npm >/dev/null 2>&1; then missing="$$missing nodejs npm"; fi; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; run make as root to install them with apt-get" >&2; exit 1; fi; \
		echo "installing with apt-get:$$missing"; \
		apt-get -o DPkg::Lock::Timeout=600 update -q && $(APT_INSTALL) $$missing; \
	fi

$(PY):
	@python="$$($(FIND_PYTHON))"; [ -n "$$python" ] || { echo "no python3 >= 3.11 with venv found" >&2; exit 1; }; \
	echo "making $(VENV) with $$(command -v $$python)"; \
	$$python -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

$(INSTALLED): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

# promtool, for the tests that check /metrics and the Grafana dashboard's PromQL: taken out of
# Debian's prometheus package (a 19 MB download) into .cache/, where installing the package
# would add 96 MB and a Prometheus server. `apt-get download` needs no root, but it needs the
# package lists, which it fetches as root when they lack the package.
PROMTOOL := .cache/prometheus/usr/bin/promtool
promtool: $(PROMTOOL)
$(PROMTOOL):
	@rm -rf .cache/prometheus && mkdir -p .cache/prometheus
	@cd .cache/prometheus && { apt-get -q -o APT::Sandbox::User=root download prometheus 2>/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "apt-get download prometheus failed; as root, make runs apt-get update first" >&2; exit 1; }; \
		apt-get -o DPkg::Lock::Timeout=600 update -q && apt-get -q -o APT::Sandbox::User=root download prometheus; }; }
	dpkg-deb --fsys-tarfile .cache/prometheus/prometheus_*.deb | tar -x -C .cache/prometheus ./usr/bin/promtool
	@rm .cache/prometheus/prometheus_*.deb && $@ --version | head -1

# PROMTOOL in the environment: the tests that need it fail, rather than skip, when it is missing.
test: deps $(PROMTOOL)
	PROMTOOL=$(CURDIR)/$(PROMTOOL) $(PY) -m pytest

schema: deps
	$(PY) -m proxyctl schema > schema/proxyctl.schema.json

# The image: with docker where a daemon answers, else with podman configured by .ci/containers.conf
# (installed with apt-get when missing, with debian:bookworm-slim made from Debian's archive when
# it cannot be pulled). Behind a TLS-intercepting proxy, pip in the build needs the CA bundle
# pip uses here: it is passed as a build secret, so it stays out of the image.
PIP_CA ?= $(firstword $(wildcard $(PIP_CERT) $(REQUESTS_CA_BUNDLE) $(SSL_CERT_FILE)))
comma := ,
CA_SECRET := $(if $(PIP_CA),--secret id=pip-ca$(comma)src=$(PIP_CA))
image:
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then \
		set -x; DOCKER_BUILDKIT=1 docker build $(CA_SECRET) -t $(IMAGE) .; \
	else \
		export CONTAINERS_CONF="$${CONTAINERS_CONF:-$(CURDIR)/.ci/containers.conf}"; \
		.ci/debian-base && set -x && podman build --network host --runtime runc $(CA_SECRET) -t $(IMAGE) .; \
	fi

# A clone run through the README's two commands in a bare Debian 12 container (slow; not in `make test`).
fresh-debian-check:
	.ci/fresh-debian-check

# Real nginx under proxyctl, a test API server, and DogStatsD traffic on 127.0.0.x only.
demo: deps
	$(PY) examples/demo.py

# The benchmarks of docs/benchmarks.md; they also need redis-server, redis-tools, haproxy and matplotlib.
bench: deps
	$(PY) -m bench
