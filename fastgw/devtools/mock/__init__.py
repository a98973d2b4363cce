"""The built-in mock LLM upstream: the demo default of `fastgw serve`, `fastgw mock`, and the perf upstream. It
answers in every wire format at once, on one port (their paths do not collide):

  server.py     the HTTP server (asyncio Protocol, keep-alive, pipelining), fault injection by x-mock-* headers,
                stats, and `Routes`, the dispatch table (method, path) -> (handler, error function)
  wire.py       the contract between the server and a wire format: MockRequest in; JsonReply, StreamReply or a
                raised Refusal out; the canned text; byte templates (Canned, TemplateCache) so answers are
                rendered once
  tools.py      tool-call arguments built from a tool's JSON schema, shared by the formats
  openai.py     OpenAI: /v1/chat/completions (with tool calls), completions, responses, embeddings, models
                (list and retrieve)
  openai_media.py   OpenAI: /v1/moderations, /v1/images/{generations,edits,variations}, /v1/audio/{transcriptions,
                translations,speech}: answers derived from the request (the upload's size and SHA-256), speech a
                long binary body streamed under backpressure
  openai_files.py   OpenAI: /v1/files (upload, list, retrieve, content, delete), /v1/uploads (parts, complete,
                cancel), /v1/vector_stores and their files
  openai_jobs.py    OpenAI: /v1/batches (run at once by the mock's own handlers, output and error files),
                /v1/fine_tuning/jobs (and cancel, events)
  store.py      what those stateful endpoints keep, per mock server (MockRequest.state), and their shared helpers
                (ids, cursor pages, 404s)
  multipart.py  multipart/form-data bodies (RFC 7578), for the upload endpoints
  anthropic.py  Anthropic Messages: /v1/messages (streamed, tool use), /v1/messages/count_tokens, and its
                GET /v1/models (the requests with an anthropic-version header: OpenAI's list shares the path)
  gemini.py     Gemini v1beta: /v1beta/models/{model}:generateContent, :streamGenerateContent, :countTokens, and
                GET /v1beta/models
  azure.py      Azure OpenAI: /openai/deployments/{deployment}/chat/completions, completions, embeddings
  realtime.py   the Realtime API over WebSocket: GET /v1/realtime?model=M, Azure's GET /openai/realtime

Adding another wire format is one new module and one line here, without touching the server: handlers `def
handler(req: MockRequest) -> JsonReply | StreamReply | BytesReply | BodyStream` (render answers once per key with
TemplateCache, fill token counts per request; raise Refusal for bad input), a `ROUTES = ((b"POST", b"/path",
handler), ...)` and an `error_body(status, message, code)` in the provider's error shape (returning a JsonReply when
the answer needs headers, such as a 429's retry-after), registered below with `ROUTES.add_all(module.ROUTES,
module.error_body)`. The error function renders that format's refusals and its x-mock-status answers. A path ending
in "*" matches by prefix, for formats that put the model in the path (gemini.py, azure.py).
"""
from fastgw.devtools.mock import anthropic, azure, gemini, openai, openai_files, openai_jobs, openai_media, realtime
from fastgw.devtools.mock.openai import EMBEDDING_DIM
from fastgw.devtools.mock.server import ROUTES, MockServer, MockStats, Routes, run_mock, start_mock

ROUTES.add_all(openai.ROUTES)  # OpenAI's error shape is the default
ROUTES.add_all(openai_media.ROUTES)
ROUTES.add_all(openai_files.ROUTES)
ROUTES.add_all(openai_jobs.ROUTES)
ROUTES.add_all(anthropic.ROUTES, anthropic.error_body)
ROUTES.add_all(gemini.ROUTES, gemini.error_body)
ROUTES.add_all(azure.ROUTES, azure.error_body)
ROUTES.add_all(realtime.ROUTES)

__all__ = ["EMBEDDING_DIM", "ROUTES", "MockServer", "MockStats", "Routes", "run_mock", "start_mock"]
