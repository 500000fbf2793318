# Everything a fresh clone needs: `make test`, `make demo`, `make bench`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: test lint typecheck pytest demo migrate-demo failover-demo bench bench-smoke bench-deps run system-deps clean promtool

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# redis-server is needed by the tests (they start their own on free ports) and by the
# embedded Redis mode of the demo; chromium and chromium-driver by the browser test of
# the demo (tests/test_browser_demo.py); PostgreSQL's initdb/pg_ctl by the legacy session
# tests (tests/postgres.py: a private server on a free port, never the machine's own).
# apt-get only runs when one is missing.
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  echo "installing chromium and chromium-driver with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver; }
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

lint: $(STAMP)
	$(BIN)/ruff check gateway plugins tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	# The security suite again under aiohttp's pure-Python HTTP parser.
	AIOHTTP_NO_EXTENSIONS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m security $(PYTEST_ARGS)

test: lint typecheck pytest

run: $(STAMP) system-deps
	$(BIN)/python -m gateway --config config.yaml $(ARGS)

demo: $(STAMP) system-deps
	$(BIN)/python -m examples.fake_web_retailer.demo $(ARGS)

# The case study's migration roadmap: the shop in legacy mode, then the gateway in front
# at 10 %, 100 %, Redis only, cut over; session writes per minute at each phase.
migrate-demo: $(STAMP) system-deps
	$(BIN)/python -m examples.fake_web_retailer.migrate_demo $(ARGS)

# The benchmark's OpenResty peer (scenarios n, o, o2; bench/peer/README.md): Debian's
# nginx-light with the Lua module. Only `make bench`/`bench-smoke` install it here; the
# smoke test (run by `make test`) installs it itself (bench/openresty.py: ensure_openresty),
# as `python -m bench` does. Debian's nginx package would start a system nginx on port 80
# where policy-rc.d allows it; the benchmark never uses it (all its nginx are private).
bench-deps:
	@{ command -v wrk && test -e /usr/lib/nginx/modules/ngx_http_lua_module.so && \
	   test -e /usr/share/lua/5.1/resty/core.lua; } >/dev/null || { \
	  echo "installing wrk nginx-light libnginx-mod-http-lua lua-resty-core with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    wrk nginx-light libnginx-mod-http-lua lua-resty-core; }

bench: $(STAMP) system-deps bench-deps
	$(BIN)/python -m bench $(ARGS)

bench-smoke: $(STAMP) system-deps bench-deps
	$(BIN)/python -m bench --smoke $(ARGS)

# Kills a Sentinel-watched master, then a Cluster master, under load through a gateway,
# and prints the failure-recovery matrix measured on this machine (bench/failover_demo.py).
failover-demo: $(STAMP) system-deps
	$(BIN)/python -m bench.failover_demo $(ARGS)

# promtool validates deploy/prometheus/ (tests/test_dashboards.py runs it when present).
# Extracted from Debian's prometheus package into .venv/bin: installing the package would
# also start a Prometheus server (on the admin listener's usual port), so it is not part
# of `make test`.
promtool: $(STAMP)
	@test -x $(BIN)/promtool || { \
	  tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -qq prometheus && \
	  dpkg -x prometheus_*.deb x) && cp $$tmp/x/usr/bin/promtool $(BIN)/promtool; \
	  status=$$?; rm -rf $$tmp; exit $$status; }
	$(BIN)/promtool --version | head -1

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
