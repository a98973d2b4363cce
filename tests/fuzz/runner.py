"""One fuzz target under atheris (libFuzzer): `python -m tests.fuzz.runner TARGET [libFuzzer options] [CORPUS...]`.

Started by `python -m tests.fuzz` and the tests, with native.child_env(): the compiled modules come from the
instrumented build (their C branches and comparisons guide libFuzzer, AddressSanitizer watches their memory),
and the Python that runs with them (the harness, its oracles h11 and the twins, fastgw's Python modules and the
wire translations) is instrumented by atheris as it is imported. Any exception escaping the harness (an
oracle's AssertionError, or anything a target raised that it should not) is a finding: atheris prints it,
writes the input to the artifact prefix and exits non-zero.
"""
import importlib
import os
import sys
import traceback

from tests.fuzz import TARGETS, native


def main(argv: list[str]) -> None:
    target = argv[1]
    if target not in TARGETS:
        raise SystemExit(f"unknown target {target!r}; one of: {', '.join(TARGETS)}")
    compiled = native.install()
    import atheris

    with atheris.instrument_imports(include=["fastgw", "h11", "tests.core", "tests.unit", "tests.fuzz.targets"]):
        harness = importlib.import_module(f"tests.fuzz.targets.{target}")
    if compiled:
        for name in native.MODULES:
            module = sys.modules.get(name)
            if module is not None and not native.instrumented(module):
                raise SystemExit(f"{name} did not load from the instrumented build")
    print(f"fuzz: target {target}, compiled modules {'instrumented' if compiled else 'NOT instrumented'}",
          file=sys.stderr, flush=True)
    # libFuzzer runs argv[0] through the shell for -merge and -fork: this command, not the bare script path.
    atheris.Setup([f"{sys.executable} -m tests.fuzz.runner {target}", *argv[2:]], _abort_on_exception(harness))
    atheris.Fuzz()


def _abort_on_exception(harness):
    """The harness, ending the process with SIGABRT when it raises: libFuzzer's signal handler then writes the
    input at once. (Left to atheris, the exception exits through the atexit handlers, slow under ASan, and
    libFuzzer's next SIGALRM could kill the process before the input was saved.)"""
    def one_input(data: bytes) -> None:
        try:
            harness.one_input(data)
        except BaseException:
            print("\n=== Uncaught Python exception: ===", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os.abort()
    return one_input


if __name__ == "__main__":
    main(sys.argv)
