# The README's commands. `deps` installs what a fresh Debian machine lacks.
PYTHON ?= python3
STREAM_MODULE := /usr/lib/nginx/modules/ngx_stream_module.so

.PHONY: deps test demo bench schema

deps:
	@if ! command -v nginx >/dev/null || ! [ -e $(STREAM_MODULE) ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx libnginx-mod-stream; \
	fi
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'

test: deps
	$(PYTHON) -m pytest

schema:
	$(PYTHON) -m proxyctl schema > schema/proxyctl.schema.json

# Real nginx under proxyctl, a test API server, and DogStatsD traffic on 127.0.0.x only.
demo: deps
	$(PYTHON) examples/demo.py

# The benchmarks of docs/benchmarks.md; they also need redis-server, redis-tools, haproxy and matplotlib.
bench: deps
	$(PYTHON) -m bench
