"""fastgw: an OpenAI-compatible AI gateway whose hot path is compiled with Cython."""

__version__ = "0.1.0"

from fastgw._core import check_built as _check_built  # noqa: E402

_check_built()
