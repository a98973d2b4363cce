# The two commands a newcomer needs: `make run` and `make test`. Everything they need is installed here.
PY ?= python3

.PHONY: run test install system-deps

run: install
	$(PY) -m fastgw serve

test: system-deps install
	$(PY) -m pytest -q

install:
	$(PY) -m pip install -q -e '.[test]'

# redis-server (limit tests), nginx and wrk (perf suite) from Debian; skipped when already present.
system-deps:
	@command -v redis-server >/dev/null && command -v nginx >/dev/null && command -v wrk >/dev/null || \
	  ( [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server nginx-light wrk >/dev/null )
