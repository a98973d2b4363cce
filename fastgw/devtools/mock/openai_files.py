"""OpenAI's files, uploads and vector stores on the mock, kept per mock server (store.py):

  POST /v1/files (multipart: file, purpose[, expires_after[anchor], expires_after[seconds]])   -> File
  GET /v1/files (purpose, limit, after, order), GET /v1/files/{id}, DELETE /v1/files/{id}
  GET /v1/files/{id}/content                      the file's bytes (application/octet-stream)
  POST /v1/uploads (JSON: bytes, filename, mime_type, purpose)                                 -> Upload
  POST /v1/uploads/{id}/parts (multipart: data)   -> UploadPart
  POST /v1/uploads/{id}/complete (JSON: part_ids[, md5]) -> Upload with its File; the parts' sizes must add up
                                                  to the declared bytes
  POST /v1/uploads/{id}/cancel
  POST/GET /v1/vector_stores, GET/POST/DELETE /v1/vector_stores/{id}
  POST/GET /v1/vector_stores/{id}/files, GET/DELETE /v1/vector_stores/{id}/files/{file_id}

Vector stores index nothing: their files are "completed" at once (usage_bytes: the file's size), so the SDK's
create_and_poll helpers return at once.

Response headers the mock adds: `x-mock-sha256` (the SHA-256 hex of the bytes as received) on POST /v1/files, on
an upload's parts and complete (the whole file's), and on a file's content; `x-mock-content: stored|regenerated`
on the content (see store.py for files over KEEP_BYTES). An upload's parts are held in memory until it completes
(OpenAI caps a part at 64 MB); the completed file then follows the KEEP_BYTES rule.
"""
from __future__ import annotations

import hashlib

from fastgw.devtools.mock.store import (
    Upload, VectorStore, form, json_body, new_id, not_found, now, page, path_ids, reply, required, store,
    unknown_url)
from fastgw.devtools.mock.wire import BodyStream, BytesReply, MockRequest, Refusal, seeded_pieces

FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
UPLOAD_BYTES_MAX = 8 * 1024 ** 3   # OpenAI's limit for an Upload
OCTETS = b"application/octet-stream"


def _sha_header(sha256: str) -> bytes:
    return b"x-mock-sha256: " + sha256.encode() + b"\r\n"


# -- files ----------------------------------------------------------------------------------------------

def create_file(req: MockRequest):
    f = form(req)
    part = f.part("file")
    if part is None:
        raise Refusal(400, "Missing required parameter: 'file'.", "missing_required_parameter")
    purpose = _purpose(f.value("purpose"))
    expires_at = None
    seconds = f.value("expires_after[seconds]")
    if seconds is not None:
        if f.value("expires_after[anchor]") != "created_at" or not seconds.isdigit():
            raise Refusal(400, "Invalid 'expires_after': expected anchor 'created_at' and a number of seconds.",
                          "invalid_value")
        expires_at = now() + int(seconds)
    stored = store(req).add_file(part.filename or "file", purpose, [part.data], expires_at)
    return reply(stored.obj, headers=_sha_header(stored.sha256))


def _purpose(purpose: str | None) -> str:
    if not purpose:
        raise Refusal(400, "Missing required parameter: 'purpose'.", "missing_required_parameter")
    if purpose not in FILE_PURPOSES:
        raise Refusal(400, f"Invalid value for 'purpose': {purpose!r}. Expected one of "
                           f"{', '.join(FILE_PURPOSES)}.", "invalid_value")
    return purpose


def list_files(req: MockRequest):
    purpose = req.query_param("purpose")
    files = [f.obj for f in store(req).files.values() if not purpose or f.obj["purpose"] == purpose]
    return page(req, files, default_limit=10000, max_limit=10000)


def file_get(req: MockRequest):
    """GET /v1/files/{id} and /v1/files/{id}/content."""
    ids = path_ids(req, b"/v1/files/")
    f = store(req).file(ids[0])
    if len(ids) == 1:
        return reply(f.obj)
    if ids[1:] != ["content"]:
        raise unknown_url(req)
    if f.data is not None:
        return BytesReply(200, f.data, OCTETS, _sha_header(f.sha256) + b"x-mock-content: stored\r\n")
    return BodyStream(seeded_pieces(f.obj["id"], f.obj["bytes"]), OCTETS,
                      _sha_header(f.sha256) + b"x-mock-content: regenerated\r\n")


def file_delete(req: MockRequest):
    ids = path_ids(req, b"/v1/files/")
    if len(ids) != 1:
        raise unknown_url(req)
    s = store(req)
    s.file(ids[0])
    del s.files[ids[0]]
    return reply({"id": ids[0], "object": "file", "deleted": True})


# -- uploads --------------------------------------------------------------------------------------------

def create_upload(req: MockRequest):
    body = json_body(req)
    size = required(body, "bytes", int)
    filename = required(body, "filename")
    required(body, "mime_type")
    purpose = _purpose(body.get("purpose"))
    if not 0 < size <= UPLOAD_BYTES_MAX:
        raise Refusal(400, f"Invalid 'bytes': an Upload holds 1 byte to {UPLOAD_BYTES_MAX} bytes.", "invalid_value")
    created = now()
    obj = {"id": new_id("upload_"), "object": "upload", "bytes": size, "created_at": created,
           "expires_at": created + 3600, "filename": filename, "purpose": purpose, "status": "pending",
           "file": None}
    store(req).uploads[obj["id"]] = Upload(obj)
    return reply(obj)


def upload_post(req: MockRequest):
    """POST /v1/uploads/{id}/parts, /complete and /cancel."""
    ids = path_ids(req, b"/v1/uploads/")
    if len(ids) != 2 or ids[1] not in ("parts", "complete", "cancel"):
        raise unknown_url(req)
    s = store(req)
    up = s.uploads.get(ids[0])
    if up is None:
        raise not_found("Upload", ids[0])
    status = up.obj["status"]
    if status != "pending":
        raise Refusal(400, f"Upload {ids[0]} is already {status}.", "invalid_state")
    action = ids[1]
    if action == "parts":
        data = form(req).part("data")
        if data is None:
            raise Refusal(400, "Missing required parameter: 'data'.", "missing_required_parameter")
        part = {"id": new_id("part_"), "object": "upload.part", "created_at": now(), "upload_id": ids[0]}
        up.parts[part["id"]] = (part, data.data)
        return reply(part, headers=_sha_header(hashlib.sha256(data.data).hexdigest()))
    if action == "cancel":
        up.obj["status"] = "cancelled"
        up.parts.clear()
        return reply(up.obj)
    part_ids = json_body(req).get("part_ids")
    if not isinstance(part_ids, list) or not part_ids or not all(isinstance(p, str) for p in part_ids):
        raise Refusal(400, "Missing required parameter: 'part_ids'.", "missing_required_parameter")
    unknown = [p for p in part_ids if p not in up.parts]
    if unknown:
        raise Refusal(400, f"Invalid 'part_ids': {unknown[0]} is not a part of upload {ids[0]}.", "invalid_value")
    pieces = [up.parts[p][1] for p in part_ids]
    total = sum(len(p) for p in pieces)
    if total != up.obj["bytes"]:
        raise Refusal(400, f"The parts add up to {total} bytes; the upload was created for {up.obj['bytes']}.",
                      "invalid_value")
    stored = s.add_file(up.obj["filename"], up.obj["purpose"], pieces)
    up.parts.clear()
    up.obj["status"] = "completed"
    up.obj["file"] = stored.obj
    return reply(up.obj, headers=_sha_header(stored.sha256))


# -- vector stores --------------------------------------------------------------------------------------

_CHUNKING = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}


def _vs_counts(vs: VectorStore) -> None:
    total = len(vs.files)
    vs.obj["file_counts"] = {"in_progress": 0, "completed": total, "failed": 0, "cancelled": 0, "total": total}
    vs.obj["usage_bytes"] = sum(f["usage_bytes"] for f in vs.files.values())
    vs.obj["last_active_at"] = now()


def _vs_settings(vs: VectorStore, body: dict) -> None:
    """name, metadata and expires_after from a create or modify body."""
    if "name" in body:
        if not isinstance(body["name"], (str, type(None))):
            raise Refusal(400, "Invalid 'name': expected a string.", "invalid_value")
        vs.obj["name"] = body["name"] or ""
    if "metadata" in body:
        if not isinstance(body["metadata"], (dict, type(None))):
            raise Refusal(400, "Invalid 'metadata': expected an object.", "invalid_value")
        vs.obj["metadata"] = body["metadata"] or {}
    if body.get("expires_after") is not None:
        exp = body["expires_after"]
        if not isinstance(exp, dict) or exp.get("anchor") != "last_active_at" or not isinstance(exp.get("days"), int):
            raise Refusal(400, "Invalid 'expires_after': expected anchor 'last_active_at' and days.", "invalid_value")
        vs.obj["expires_after"] = {"anchor": "last_active_at", "days": exp["days"]}
        vs.obj["expires_at"] = now() + exp["days"] * 86400


def _vs_add_file(req: MockRequest, vs: VectorStore, file_id, attributes=None) -> dict:
    if not isinstance(file_id, str) or not file_id:
        raise Refusal(400, "Missing required parameter: 'file_id'.", "missing_required_parameter")
    f = store(req).file(file_id)
    obj = {"id": file_id, "object": "vector_store.file", "created_at": now(), "usage_bytes": f.obj["bytes"],
           "vector_store_id": vs.obj["id"], "status": "completed", "last_error": None,
           "chunking_strategy": _CHUNKING, "attributes": attributes if isinstance(attributes, dict) else {}}
    vs.files[file_id] = obj
    return obj


def create_vector_store(req: MockRequest):
    body = json_body(req)
    created = now()
    vs = VectorStore({"id": new_id("vs_"), "object": "vector_store", "created_at": created, "name": "",
                      "status": "completed", "usage_bytes": 0, "last_active_at": created, "metadata": {},
                      "expires_after": None, "expires_at": None})
    _vs_settings(vs, body)
    file_ids = body.get("file_ids") or []
    if not isinstance(file_ids, list):
        raise Refusal(400, "Invalid 'file_ids': expected an array of file ids.", "invalid_value")
    for file_id in file_ids:
        _vs_add_file(req, vs, file_id)
    _vs_counts(vs)
    store(req).vector_stores[vs.obj["id"]] = vs
    return reply(vs.obj)


def list_vector_stores(req: MockRequest):
    return page(req, [vs.obj for vs in store(req).vector_stores.values()])


def _vs(req: MockRequest) -> tuple[VectorStore, list[str]]:
    ids = path_ids(req, b"/v1/vector_stores/")
    vs = store(req).vector_stores.get(ids[0])
    if vs is None:
        raise not_found("vector store", ids[0])
    if len(ids) > 3 or (len(ids) > 1 and ids[1] != "files"):
        raise unknown_url(req)
    return vs, ids[1:]


def vector_store_get(req: MockRequest):
    """GET /v1/vector_stores/{id}, .../files (list), .../files/{file_id}."""
    vs, rest = _vs(req)
    if not rest:
        return reply(vs.obj)
    if len(rest) == 1:
        status = req.query_param("filter")
        files = [f for f in vs.files.values() if not status or f["status"] == status]
        return page(req, files)
    f = vs.files.get(rest[1])
    if f is None:
        raise not_found("vector store file", rest[1])
    return reply(f)


def vector_store_post(req: MockRequest):
    """POST /v1/vector_stores/{id} (modify) and .../files (add a file)."""
    vs, rest = _vs(req)
    body = json_body(req)
    if not rest:
        _vs_settings(vs, body)
        vs.obj["last_active_at"] = now()
        return reply(vs.obj)
    if len(rest) != 1:
        raise unknown_url(req)
    obj = _vs_add_file(req, vs, body.get("file_id"), body.get("attributes"))
    _vs_counts(vs)
    return reply(obj)


def vector_store_delete(req: MockRequest):
    vs, rest = _vs(req)
    if not rest:
        del store(req).vector_stores[vs.obj["id"]]
        return reply({"id": vs.obj["id"], "object": "vector_store.deleted", "deleted": True})
    if len(rest) != 2:
        raise unknown_url(req)
    if vs.files.pop(rest[1], None) is None:
        raise not_found("vector store file", rest[1])
    _vs_counts(vs)
    return reply({"id": rest[1], "object": "vector_store.file.deleted", "deleted": True})


ROUTES = (
    (b"POST", b"/v1/files", create_file),
    (b"GET", b"/v1/files", list_files),
    (b"GET", b"/v1/files/*", file_get),
    (b"DELETE", b"/v1/files/*", file_delete),
    (b"POST", b"/v1/uploads", create_upload),
    (b"POST", b"/v1/uploads/*", upload_post),
    (b"POST", b"/v1/vector_stores", create_vector_store),
    (b"GET", b"/v1/vector_stores", list_vector_stores),
    (b"GET", b"/v1/vector_stores/*", vector_store_get),
    (b"POST", b"/v1/vector_stores/*", vector_store_post),
    (b"DELETE", b"/v1/vector_stores/*", vector_store_delete),
)
