#!/bin/sh
# Flamegraph of fastgw under load: perf/flamegraph.sh [SCENARIO] [SECONDS]   (default: proxy 10)
#   -> perf/results/flamegraph-<scenario>.svg
#
# py-spy samples the worker process with --native, so Cython functions (fastgw/**/*.pyx)
# show by name next to the Python frames. For complete native stacks build with frame pointers and symbols
# first (this rebuilds every extension in place):
#   FLAMEGRAPH_BUILD=1 perf/flamegraph.sh proxy
# which runs `FASTGW_PROFILE=1 python setup.py build_ext --inplace` (see setup.py: -g -fno-omit-frame-pointer).
# Needs py-spy (pip install py-spy) and ptrace rights on the worker (root, or CAP_SYS_PTRACE in a container).
# How to read the result: perf/README.md, "Reading a flamegraph".
set -eu
cd "$(dirname "$0")/.."
scenario="${1:-proxy}"
seconds="${2:-10}"
command -v py-spy >/dev/null || { echo "py-spy not found: pip install py-spy" >&2; exit 1; }
if [ "${FLAMEGRAPH_BUILD:-0}" = 1 ]; then
    FASTGW_PROFILE=1 python setup.py build_ext --inplace -q
fi
exec python -m perf run "$scenario" --no-references --profile --no-save --duration "$seconds" --warmup 2
