"""Azure OpenAI of the mock: POST /openai/deployments/{deployment}/chat/completions, /completions and /embeddings
?api-version=..., answered by the OpenAI renderers (openai.py, tool calls included) with the deployment name as
the model, plus what Azure adds and refuses (recorded samples: tests/data/wire/azure/):

- the api-version query parameter is required: without it (or for an operation Azure does not have) 404
  {"error": {"code": "404", "message": "Resource not found"}}, as Azure answers;
- the key comes in an api-key header or as `authorization: Bearer <token>` (any non-empty value); without
  one, 401 {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API
  endpoint. ..."}};
- the prompt filter: a chat or completion stream starts with Azure's `"choices": []` chunk carrying
  prompt_filter_results (id, model and object empty, created 0), and a non-streamed answer carries
  prompt_filter_results too (the per-choice content_filter_results are left out);
- the content filter: when the last user message (completions: the prompt) contains FASTGW_CONTENT_FILTER,
  400 with Azure's content_filter error body (innererror ResponsibleAIPolicyViolation).

A body needs no model (the deployment names it). Errors: request validation (400) keeps OpenAI's shape, as
Azure passes OpenAI's own; the other statuses have Azure's {"error": {"code": "<status>", "message"}}, a 429
with retry-after.
"""
from __future__ import annotations

import orjson

from fastgw.devtools.mock import openai
from fastgw.devtools.mock.wire import JsonReply, MockRequest, Refusal, StreamReply, frame, openai_error_body

PREFIX = b"/openai/deployments/"
CONTENT_FILTER_TRIGGER = "FASTGW_CONTENT_FILTER"
ACCESS_DENIED = ("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
                 "valid key for an active subscription and use a correct regional API endpoint for your resource.")
RETRY_AFTER = b"retry-after: 1\r\n"


def error_body(status: int, message: str, code: str | None = None):
    """Azure's error JSON for `status` (the route table's error function)."""
    if status == 400:
        return openai_error_body(status, message, code)
    body = orjson.dumps({"error": {"code": str(status), "message": message}})
    if status == 429:
        return JsonReply(status, body, RETRY_AFTER)
    return body


def _safe(filtered_category: str | None = None) -> dict:
    results = {"hate": {"filtered": False, "severity": "safe"},
               "jailbreak": {"filtered": False, "detected": False},
               "self_harm": {"filtered": False, "severity": "safe"},
               "sexual": {"filtered": False, "severity": "safe"},
               "violence": {"filtered": False, "severity": "safe"}}
    if filtered_category is not None:
        results[filtered_category] = {"filtered": True, "severity": "medium"}
    return results


_PROMPT_FILTER_RESULTS = orjson.dumps([{"prompt_index": 0, "content_filter_results": _safe()}])
_PROMPT_FILTER_EVENT = frame(b"data: " + orjson.dumps({
    "choices": [], "created": 0, "id": "", "model": "", "object": "",
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _safe()}]}) + b"\n\n")
CONTENT_FILTER_BODY = orjson.dumps({"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
               "policy. Please modify your prompt and retry. To learn more about our content filtering policies "
               "please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": _safe("violence")}}})


def _with_prompt_filter(reply):
    """The answer with Azure's prompt_filter_results: a first chunk of a stream, a field of a body."""
    if reply.__class__ is StreamReply:
        return StreamReply([_PROMPT_FILTER_EVENT, *reply.events], reply.content_type)
    return JsonReply(reply.status, b'{"prompt_filter_results":' + _PROMPT_FILTER_RESULTS + b"," + reply.body[1:],
                     reply.headers)


def _text_of(content) -> str:
    """The text of a chat message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user_text(messages) -> str:
    if not isinstance(messages, list):
        return ""
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    return _text_of(last.get("content")) if last is not None else ""


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "".join(p for p in prompt if isinstance(p, str))
    return ""


def chat(req: MockRequest, obj: dict, deployment: str):
    if CONTENT_FILTER_TRIGGER in _last_user_text(obj.get("messages")):
        return JsonReply(400, CONTENT_FILTER_BODY)
    return _with_prompt_filter(openai.answer_chat(req, obj, deployment))


def completions(req: MockRequest, obj: dict, deployment: str):
    if CONTENT_FILTER_TRIGGER in _prompt_text(obj.get("prompt")):
        return JsonReply(400, CONTENT_FILTER_BODY)
    return _with_prompt_filter(openai.answer_completion(req, obj, deployment))


def embeddings(req: MockRequest, obj: dict, deployment: str):
    return openai.answer_embeddings(req, obj, deployment)


_OPERATIONS = {b"chat/completions": chat, b"completions": completions, b"embeddings": embeddings}


def deployments(req: MockRequest):
    """POST /openai/deployments/{deployment}/{operation}?api-version=..."""
    deployment, _, operation = req.path[len(PREFIX):].partition(b"/")
    handler = _OPERATIONS.get(operation)
    if not deployment or handler is None or not req.query_param("api-version"):
        raise Refusal(404, "Resource not found")
    if not req.header(b"api-key") and req.bearer() is None:
        raise Refusal(401, ACCESS_DENIED)
    return handler(req, openai.parse_json(req), deployment.decode("latin-1"))


ROUTES = (
    (b"POST", PREFIX + b"*", deployments),
)
