"""The built-in mock LLM upstream: the demo default of `fastgw serve`, `fastgw mock`, and the perf upstream.

  server.py   the HTTP server (asyncio Protocol, keep-alive, pipelining), fault injection by x-mock-* headers,
              stats, and `Routes`, the dispatch table (method, path) -> handler
  wire.py     the contract between the server and a wire format: MockRequest in; JsonReply, StreamReply or a
              raised Refusal out; byte templates (Canned, TemplateCache) so answers are rendered once
  openai.py   the OpenAI wire format: chat, completions, responses, embeddings, models

Adding another provider's wire format is one new module and one line here, without touching the server:
write e.g. `anthropic.py` with handlers `def messages(req: MockRequest) -> JsonReply | StreamReply` (render
answers once per key with TemplateCache, fill token counts per request; raise Refusal for bad input), a
`ROUTES = ((b"POST", b"/v1/messages", messages),)` and an `error_body(status, message, code) -> bytes` in the
provider's error shape, then register it below with `ROUTES.add_all(anthropic.ROUTES, anthropic.error_body)`.
The error function renders that format's refusals and its x-mock-status answers. A path ending in "*" matches
by prefix, for formats that put the model in the path (Gemini: b"/v1beta/models/*", the handler splitting
`req.path` at ":" for generateContent / streamGenerateContent and reading `req.query` for alt=sse).
"""
from fastgw.devtools.mock import anthropic, azure, gemini, openai
from fastgw.devtools.mock.openai import EMBEDDING_DIM
from fastgw.devtools.mock.server import ROUTES, MockServer, MockStats, Routes, run_mock, start_mock

ROUTES.add_all(openai.ROUTES)  # OpenAI's error shape is the default
ROUTES.add_all(anthropic.ROUTES, anthropic.error_body)
ROUTES.add_all(gemini.ROUTES, gemini.error_body)
ROUTES.add_all(azure.ROUTES, azure.error_body)

__all__ = ["EMBEDDING_DIM", "ROUTES", "MockServer", "MockStats", "Routes", "run_mock", "start_mock"]
