"""fastgw: an OpenAI-compatible AI gateway whose hot path is compiled with Cython."""

__version__ = "0.1.0"

import os as _os

from fastgw.build_check import check_built as _check_built  # noqa: E402

# FASTGW_SKIP_BUILD_CHECK=1 is for working on one extension while another is mid-edit; it adds no fallback:
# a module that is not built still fails where it is imported.
if _os.environ.get("FASTGW_SKIP_BUILD_CHECK") != "1":
    _check_built()
