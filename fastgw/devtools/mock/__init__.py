"""The built-in mock LLM upstream: the demo default of `fastgw serve`, `fastgw mock`, and the perf upstream."""
from fastgw.devtools.mock.server import EMBEDDING_DIM, MockServer, MockStats, run_mock, start_mock

__all__ = ["EMBEDDING_DIM", "MockServer", "MockStats", "run_mock", "start_mock"]
