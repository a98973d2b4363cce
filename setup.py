"""Build the Cython extensions: every .pyx under fastgw/.

Switches (environment variables), for profiling and debugging builds:
  FASTGW_ANNOTATE=1   write Cython's HTML annotation next to each .pyx (yellow = Python C-API calls)
  FASTGW_PROFILE=1    keep frame pointers and symbols (-fno-omit-frame-pointer -g) so py-spy --native
                      and perf show Cython functions by name
  FASTGW_DEBUG=1      -O0 -g and Cython bounds/wraparound checks on
"""
import os
from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTGW_DEBUG") == "1"
profile = os.environ.get("FASTGW_PROFILE") == "1"

cflags = ["-O0", "-g"] if debug else ["-O3"]
if profile:
    cflags += ["-g", "-fno-omit-frame-pointer"]

# Every .pyx under fastgw/, found by one recursive glob: a new compiled module needs no edit here.
extensions = [
    Extension(
        os.path.splitext(path)[0].replace("/", "."),
        [path],
        extra_compile_args=cflags,
    )
    for path in sorted(glob("fastgw/**/*.pyx", recursive=True))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=os.environ.get("FASTGW_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": debug,
            "wraparound": debug,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
