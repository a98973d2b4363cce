"""OpenAI's batches and fine-tuning jobs on the mock, over the files of openai_files.py (per mock server):

  POST /v1/batches (JSON: input_file_id, endpoint, completion_window "24h"[, metadata])          -> Batch
  GET /v1/batches (limit, after), GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
  POST /v1/fine_tuning/jobs (JSON: model, training_file[, validation_file, hyperparameters, method, suffix,
                             seed, metadata])                                                    -> FineTuningJob
  GET /v1/fine_tuning/jobs (limit, after), GET /v1/fine_tuning/jobs/{id}, POST /v1/fine_tuning/jobs/{id}/cancel,
  GET /v1/fine_tuning/jobs/{id}/events (limit, after)

A batch runs when it is created: its input file (purpose "batch", one JSON request a line: custom_id, method
POST, url = the batch's endpoint, body) is validated as OpenAI does (a bad line fails the whole batch, with
`errors`), then each request is answered by the mock's own handler for that endpoint (chat completions,
completions, embeddings, responses; never streamed): the answers go to an output file, the refusals to an error
file, both in OpenAI's batch output format, with request_counts and usage summed. A fine-tuning job succeeds
when it is created (a fine_tuned_model named ft:{model}:fastgw-mock:{suffix}:{id}, a results CSV file, events).

Request header `x-mock-hold: 1` on a create leaves the batch "in_progress" (the job "queued") instead, so that
cancel can be tested: a held batch's cancel answers "cancelling", and reads after it "cancelled" (as OpenAI's
do a while later); a held job's cancel answers "cancelled". Cancelling a finished one is a 400.
"""
from __future__ import annotations

import orjson

from fastgw.devtools.mock import openai
from fastgw.devtools.mock.store import (
    Job, Store, json_body, new_id, not_found, now, page, path_ids, reply, required, store, unknown_url)
from fastgw.devtools.mock.wire import MockRequest, Refusal, openai_error_body

# The endpoints a batch may target, answered by the mock's handlers.
BATCH_ENDPOINTS = {"/v1/chat/completions": openai.chat, "/v1/completions": openai.completions,
                   "/v1/embeddings": openai.embeddings, "/v1/responses": openai.responses}
_FINISHED = ("completed", "failed", "expired", "cancelled")


def _held(req: MockRequest) -> bool:
    return req.header(b"x-mock-hold") == b"1"


# -- batches --------------------------------------------------------------------------------------------

def create_batch(req: MockRequest):
    body = json_body(req)
    input_file_id = required(body, "input_file_id")
    endpoint = required(body, "endpoint")
    window = required(body, "completion_window")
    if endpoint not in BATCH_ENDPOINTS:
        raise Refusal(400, f"Invalid value for 'endpoint': {endpoint!r}. The mock's batches support "
                           f"{', '.join(BATCH_ENDPOINTS)}.", "invalid_value")
    if window != "24h":
        raise Refusal(400, "Invalid value for 'completion_window': only '24h' is supported.", "invalid_value")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise Refusal(400, "Invalid 'metadata': expected an object.", "invalid_value")
    s = store(req)
    f = s.file(input_file_id)
    if f.obj["purpose"] != "batch":
        raise Refusal(400, f"Invalid 'input_file_id': file {input_file_id} has purpose {f.obj['purpose']!r}, "
                           f"a batch needs purpose 'batch'.", "invalid_value")
    created = now()
    batch = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "model": None, "errors": None,
             "input_file_id": input_file_id, "completion_window": window, "status": "validating",
             "output_file_id": None, "error_file_id": None, "created_at": created, "in_progress_at": None,
             "expires_at": created + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
             "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "usage": None, "metadata": metadata}
    s.batches[batch["id"]] = batch
    requests, errors = _batch_lines(f.data, endpoint)
    if errors:
        batch.update(status="failed", failed_at=now(), errors={"object": "list", "data": errors})
        return reply(batch)
    batch.update(status="in_progress", in_progress_at=now(),
                 request_counts={"total": len(requests), "completed": 0, "failed": 0},
                 model=next((b.get("model") for _, b in requests if isinstance(b.get("model"), str)), None))
    if not _held(req):
        _run_batch(req, s, batch, requests)
    return reply(batch)


def _batch_lines(data: bytes | None, endpoint: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The (custom_id, body) of each request of an input file, or the errors that fail the batch."""
    def error(code, line, message):
        return {"code": code, "line": line, "message": message, "param": None}

    if data is None:
        return [], [error("file_too_large", None, "The mock keeps no bytes of files over 64 MiB.")]
    requests, errors, seen = [], [], set()
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            errors.append(error("invalid_json_line", n, "This line is not parseable as valid JSON."))
            continue
        custom_id, body = obj.get("custom_id"), obj.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(error("missing_required_parameter", n, "Missing required parameter: 'custom_id'."))
        elif custom_id in seen:
            errors.append(error("duplicate_custom_id", n, f"The custom_id {custom_id!r} is used more than once."))
        elif obj.get("method") != "POST":
            errors.append(error("invalid_method", n, "The only method batches support is POST."))
        elif obj.get("url") != endpoint:
            errors.append(error("mismatched_endpoint", n,
                                f"The url of this line does not match the batch's endpoint {endpoint}."))
        elif not isinstance(body, dict):
            errors.append(error("missing_required_parameter", n, "Missing required parameter: 'body'."))
        else:
            seen.add(custom_id)
            requests.append((custom_id, body))
    if not requests and not errors:
        errors.append(error("empty_file", None, "The batch's input file has no requests."))
    return requests, errors


def _run_batch(req: MockRequest, s: Store, batch: dict, requests: list[tuple[str, dict]]) -> None:
    """Answer every request with the endpoint's mock handler; write the output and error files."""
    handler = BATCH_ENDPOINTS[batch["endpoint"]]
    path = batch["endpoint"].encode()
    outputs, failures = [], []
    tokens_in = tokens_out = 0
    for custom_id, body in requests:
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        one = MockRequest(b"POST", path, b"", [], orjson.dumps(body), req.chunks, False, False, req.state)
        try:
            answer = handler(one)
            status, answer_body = answer.status, orjson.loads(answer.body)
        except Refusal as r:
            status, answer_body = r.status, orjson.loads(openai_error_body(r.status, r.message, r.code))
        usage = answer_body.get("usage") or {}
        tokens_in += usage.get("prompt_tokens", usage.get("input_tokens", 0))
        tokens_out += usage.get("completion_tokens", usage.get("output_tokens", 0))
        line = {"id": new_id("batch_req_"), "custom_id": custom_id,
                "response": {"status_code": status, "request_id": new_id("req_"), "body": answer_body},
                "error": None}
        (outputs if status == 200 else failures).append(line)
    batch["finalizing_at"] = now()
    for lines, key, name in ((outputs, "output_file_id", "output"), (failures, "error_file_id", "error")):
        if lines:
            content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
            batch[key] = s.add_file(f"{batch['id']}_{name}.jsonl", "batch_output", [content]).obj["id"]
    batch.update(status="completed", completed_at=now(),
                 request_counts={"total": len(requests), "completed": len(outputs), "failed": len(failures)},
                 usage={"input_tokens": tokens_in, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": tokens_out, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": tokens_in + tokens_out})


def _batch(req: MockRequest, batch_id: str) -> dict:
    batch = store(req).batches.get(batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    if batch["status"] == "cancelling":   # a cancel is answered "cancelling", and is done by the next read
        batch.update(status="cancelled", cancelled_at=now())
    return batch


def list_batches(req: MockRequest):
    s = store(req)
    return page(req, [_batch(req, b) for b in list(s.batches)])


def batch_get(req: MockRequest):
    ids = path_ids(req, b"/v1/batches/")
    if len(ids) != 1:
        raise unknown_url(req)
    return reply(_batch(req, ids[0]))


def batch_post(req: MockRequest):
    ids = path_ids(req, b"/v1/batches/")
    if ids[1:] != ["cancel"]:
        raise unknown_url(req)
    batch = _batch(req, ids[0])
    if batch["status"] in _FINISHED or batch["status"] == "cancelling":
        raise Refusal(400, f"Cannot cancel a batch with status '{batch['status']}'.", "invalid_state")
    batch.update(status="cancelling", cancelling_at=now())
    return reply(batch)


# -- fine-tuning ----------------------------------------------------------------------------------------

_DEFAULT_HYPER = {"batch_size": 1, "learning_rate_multiplier": 1.8, "n_epochs": 3}


def _hyperparameters(body: dict) -> dict:
    """The job's hyperparameters: the request's (top level or method.supervised), "auto" resolved."""
    given = body.get("hyperparameters")
    method = body.get("method")
    if given is None and isinstance(method, dict) and isinstance(method.get(method.get("type")), dict):
        given = method[method["type"]].get("hyperparameters")
    if given is not None and not isinstance(given, dict):
        raise Refusal(400, "Invalid 'hyperparameters': expected an object.", "invalid_value")
    out = dict(_DEFAULT_HYPER)
    for k, v in (given or {}).items():
        if k in out and v != "auto":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise Refusal(400, f"Invalid 'hyperparameters.{k}': expected a positive number or 'auto'.",
                              "invalid_value")
            out[k] = v
    return out


def _training_file(s: Store, body: dict, name: str) -> str | None:
    file_id = body.get(name)
    if file_id is None and name == "validation_file":
        return None
    if not isinstance(file_id, str) or not file_id:
        raise Refusal(400, f"Missing required parameter: '{name}'.", "missing_required_parameter")
    f = s.files.get(file_id)
    if f is None:
        raise Refusal(400, f"invalid {name}: {file_id}", "invalid_file")
    if f.obj["purpose"] != "fine-tune":
        raise Refusal(400, f"invalid {name}: {file_id} has purpose {f.obj['purpose']!r}, not 'fine-tune'",
                      "invalid_file")
    return file_id


def create_job(req: MockRequest):
    body = json_body(req)
    model = required(body, "model")
    s = store(req)
    training_file = _training_file(s, body, "training_file")
    validation_file = _training_file(s, body, "validation_file")
    hyper = _hyperparameters(body)
    suffix = body.get("suffix") or ""
    seed = body.get("seed")
    metadata = body.get("metadata")
    if not isinstance(suffix, str) or (seed is not None and not isinstance(seed, int)) or \
            (metadata is not None and not isinstance(metadata, dict)):
        raise Refusal(400, "Invalid 'suffix', 'seed' or 'metadata'.", "invalid_value")
    method_type = body["method"].get("type", "supervised") if isinstance(body.get("method"), dict) else "supervised"
    job = Job({"id": new_id("ftjob-"), "object": "fine_tuning.job", "model": model, "created_at": now(),
               "finished_at": None, "fine_tuned_model": None, "organization_id": "org-fastgw-mock",
               "result_files": [], "status": "validating_files", "validation_file": validation_file,
               "training_file": training_file, "hyperparameters": hyper, "trained_tokens": None, "error": None,
               "seed": 42 if seed is None else seed, "estimated_finish": None, "integrations": [],
               "metadata": metadata, "user_provided_suffix": suffix or None,
               "method": {"type": method_type, method_type: {"hyperparameters": hyper}}})
    s.jobs[job.obj["id"]] = job
    _event(job, f"Created fine-tuning job: {job.obj['id']}")
    _event(job, f"Validating training file: {training_file}")
    _event(job, "Files validated, moving job to queued state")
    job.obj["status"] = "queued"
    if not _held(req):
        _finish_job(s, job, suffix)
    return reply(job.obj)


def _finish_job(s: Store, job: Job, suffix: str) -> None:
    obj = job.obj
    _event(job, "Fine-tuning job started")
    steps = 3
    for step in range(1, steps + 1):
        _event(job, f"Step {step}/{steps}: training loss={1.0 / step:.4f}", "metrics",
               {"step": step, "train_loss": round(1.0 / step, 4), "total_steps": steps})
    results = "step,train_loss\n" + "".join(f"{i},{1.0 / i:.4f}\n" for i in range(1, steps + 1))
    result = s.add_file(f"step_metrics_{obj['id']}.csv", "fine-tune-results", [results.encode()])
    tokens = s.files[obj["training_file"]].obj["bytes"] // 4 * obj["hyperparameters"]["n_epochs"]
    obj.update(status="succeeded", finished_at=now(), trained_tokens=tokens, result_files=[result.obj["id"]],
               fine_tuned_model=f"ft:{obj['model']}:fastgw-mock:{suffix}:{obj['id'][-8:]}")
    _event(job, f"New fine-tuned model created: {obj['fine_tuned_model']}")
    _event(job, "The job has successfully completed")


def _event(job: Job, message: str, kind: str = "message", data: dict | None = None) -> None:
    job.events.append({"id": new_id("ftevent-"), "object": "fine_tuning.job.event", "created_at": now(),
                       "level": "info", "message": message, "data": data or {}, "type": kind})


def list_jobs(req: MockRequest):
    return page(req, [j.obj for j in store(req).jobs.values()])


def _job(req: MockRequest) -> tuple[Job, list[str]]:
    ids = path_ids(req, b"/v1/fine_tuning/jobs/")
    job = store(req).jobs.get(ids[0])
    if job is None:
        raise not_found("fine-tuning job", ids[0])
    return job, ids[1:]


def job_get(req: MockRequest):
    """GET /v1/fine_tuning/jobs/{id} and .../events (newest first, as OpenAI lists them)."""
    job, rest = _job(req)
    if not rest:
        return reply(job.obj)
    if rest != ["events"]:
        raise unknown_url(req)
    return page(req, job.events)


def job_post(req: MockRequest):
    job, rest = _job(req)
    if rest != ["cancel"]:
        raise unknown_url(req)
    if job.obj["status"] in ("succeeded", "failed", "cancelled"):
        raise Refusal(400, f"Cannot cancel a job with status '{job.obj['status']}'.", "invalid_state")
    job.obj["status"] = "cancelled"
    _event(job, "Fine-tuning job cancelled")
    return reply(job.obj)


ROUTES = (
    (b"POST", b"/v1/batches", create_batch),
    (b"GET", b"/v1/batches", list_batches),
    (b"GET", b"/v1/batches/*", batch_get),
    (b"POST", b"/v1/batches/*", batch_post),
    (b"POST", b"/v1/fine_tuning/jobs", create_job),
    (b"GET", b"/v1/fine_tuning/jobs", list_jobs),
    (b"GET", b"/v1/fine_tuning/jobs/*", job_get),
    (b"POST", b"/v1/fine_tuning/jobs/*", job_post),
)
