# The two commands a newcomer needs: `make run` and `make test`. Everything they need is installed here.
PY ?= python3

.PHONY: run test install system-deps

run: install
	$(PY) -m fastgw serve

test: system-deps install
	$(PY) -m pytest -q

install:
	$(PY) -m pip install -q -e '.[test]'

# Every program the tests run, as command:Debian-package (tests/conftest.py's INSTALL_HINTS names the same
# packages): redis-server (limit tests; also run as sentinels and cluster nodes), redis-cli (creates and reshards
# the test cluster), nginx and wrk (perf suite), curl (streaming), ss (TCP keepalive), clang (the fuzzers'
# instrumented build, tests/fuzz).
# Under CI a missing one fails its tests (tests/conftest.py require_tool), so install what is missing.
SYSTEM_TOOLS = redis-server:redis-server redis-cli:redis-tools nginx:nginx-light wrk:wrk curl:curl ss:iproute2 clang:clang

system-deps:
	@missing=; for tool in $(SYSTEM_TOOLS); do \
	  command -v "$${tool%%:*}" >/dev/null || missing="$$missing $${tool#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	  echo "system-deps: installing$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
