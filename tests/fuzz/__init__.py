"""Coverage-guided fuzzing (atheris, libFuzzer) of what parses untrusted bytes.

Targets (a harness each in targets/, a seed corpus each in corpus/<target>/):
  http_request       RequestParser against h11 (and forward_head, limits)
  http_response      ResponseParser against h11 (and a keep-alive connection, forward_head)
  sse_relay          SSERelay against the plain-Python twin, plain and in strip mode
  translated_stream  the event splitter of translated streams against a WHATWG reference
  jsonpeek           peek_request / peek_usage / splice against orjson
  wire_request       the request translations (a translation or a GatewayError 400)
  wire_response      the response and error translations, and the providers' response_body
  wire_stream        the stream translators behind translated_stream
  websocket          the Realtime relay's frame reader against the websockets package's frame parser

What is instrumented: the compiled modules under fuzz (fastgw/protocol http, sse, jsonpeek, websocket
and fastgw/providers/stream) are built once more by native.py with clang -fsanitize=address,fuzzer-no-link
(libFuzzer's edge counters and comparison tracing, and AddressSanitizer) into build/fuzz-native/; atheris
instruments the Python imported with the harness (fastgw's Python modules, the wire translations, h11 and the
oracles in tests/core and tests/unit). libFuzzer's value profiling (-use_value_profile=1) is on, so the
comparisons in both guide the mutations, not only the branches.

Commands (results and crash files go to build/fuzz/, not into git):
  python -m tests.fuzz run [TARGET ...] --seconds N     fuzz each target N seconds (all targets by default)
  python -m tests.fuzz replay [TARGET ...] [FILE ...]    run inputs (the corpus by default) through the harness
                                                         (--native: in the instrumented build, under ASan)
  python -m tests.fuzz merge TARGET                      minimize the committed corpus with the runs' corpora
  python -m tests.fuzz seeds                             remake the seed corpus from the tests' cases
tests/fuzz/test_fuzz.py replays every corpus and fuzzes each target briefly as part of `make test`.
"""
TARGETS = ["http_request", "http_response", "sse_relay", "translated_stream", "jsonpeek", "wire_request",
           "wire_response", "wire_stream", "websocket"]
