"""What the mock's stateful OpenAI endpoints (openai_files.py, openai_jobs.py) keep, per mock server: files and
their bytes, uploads, vector stores, batches, fine-tuning jobs; and the helpers they share: ids with OpenAI's
prefixes, cursor-paginated lists, 404s in OpenAI's shape, multipart forms and JSON bodies as Refusals.

A Store lives in MockRequest.state (one dict per start_mock), so two mock servers never see each other's files.
Files up to KEEP_BYTES are kept whole; a larger one (tests upload hundreds of MB through the gateway) keeps only
its size and SHA-256, and its content is answered with that many deterministic bytes (wire.seeded_pieces) and
the response header `x-mock-content: regenerated` (`stored` for kept bytes): a client can still check the upload's
hash, in the `x-mock-sha256` header of the file's content and of the upload answers.
"""
from __future__ import annotations

import hashlib
import secrets
import time

import orjson

from fastgw.devtools.mock import multipart
from fastgw.devtools.mock.wire import JsonReply, MockRequest, Refusal

KEEP_BYTES = 64 * 1024 * 1024


def new_id(prefix: str) -> str:
    """An id as OpenAI spells them: file-..., batch_..., vs_..., ftjob-..., upload_..., part_..."""
    return prefix + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


class StoredFile:
    """A file: its File object (`obj`), its bytes (None when over KEEP_BYTES) and their SHA-256."""

    __slots__ = ("obj", "data", "sha256")

    def __init__(self, obj: dict, data: bytes | None, sha256: str):
        self.obj = obj
        self.data = data
        self.sha256 = sha256


class Upload:
    """An Upload object and its parts: part id -> (UploadPart object, bytes)."""

    __slots__ = ("obj", "parts")

    def __init__(self, obj: dict):
        self.obj = obj
        self.parts: dict[str, tuple[dict, bytes]] = {}


class VectorStore:
    """A VectorStore object and its files: file id -> VectorStoreFile object."""

    __slots__ = ("obj", "files")

    def __init__(self, obj: dict):
        self.obj = obj
        self.files: dict[str, dict] = {}


class Job:
    """A fine-tuning job and its events (oldest first)."""

    __slots__ = ("obj", "events")

    def __init__(self, obj: dict):
        self.obj = obj
        self.events: list[dict] = []


class Store:
    """One mock server's objects, each dict in creation order (the lists' order)."""

    def __init__(self):
        self.files: dict[str, StoredFile] = {}
        self.uploads: dict[str, Upload] = {}
        self.vector_stores: dict[str, VectorStore] = {}
        self.batches: dict[str, dict] = {}
        self.jobs: dict[str, Job] = {}

    def add_file(self, filename: str, purpose: str, pieces: list[bytes], expires_at: int | None = None
                 ) -> StoredFile:
        """A new file made of `pieces` (its bytes kept up to KEEP_BYTES)."""
        size = sum(len(p) for p in pieces)
        digest = hashlib.sha256()
        for p in pieces:
            digest.update(p)
        data = (pieces[0] if len(pieces) == 1 else b"".join(pieces)) if size <= KEEP_BYTES else None
        obj = {"id": new_id("file-"), "object": "file", "bytes": size, "created_at": now(), "filename": filename,
               "purpose": purpose, "status": "processed", "expires_at": expires_at, "status_details": None}
        f = self.files[obj["id"]] = StoredFile(obj, data, digest.hexdigest())
        return f

    def file(self, file_id: str) -> StoredFile:
        f = self.files.get(file_id)
        if f is None:
            raise not_found("File object", file_id)
        return f


def store(req: MockRequest) -> Store:
    s = req.state.get("openai")
    if s is None:
        s = req.state["openai"] = Store()
    return s


# -- requests and answers ------------------------------------------------------------------------------

def not_found(kind: str, object_id: str) -> Refusal:
    """OpenAI's 404 for an unknown id, e.g. `No such File object: file-abc`."""
    return Refusal(404, f"No such {kind}: {object_id}", None)


def unknown_url(req: MockRequest) -> Refusal:
    """The 404 the server gives an unknown path, for the paths under a prefix route that name nothing."""
    return Refusal(404, f"Invalid URL ({req.method.decode()} {req.path.decode('latin-1')})", "unknown_url")


def path_ids(req: MockRequest, prefix: bytes) -> list[str]:
    """The path segments after `prefix` (e.g. b"/v1/files/"): ["file-abc", "content"]; an empty segment is an
    unknown URL."""
    rest = req.path[len(prefix):].decode("latin-1")
    parts = rest.split("/")
    if not all(parts):
        raise unknown_url(req)
    return parts


def json_body(req: MockRequest) -> dict:
    """The request body as a JSON object (an empty body is an empty object), or a 400."""
    if not req.body.strip():
        return {}
    try:
        obj = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise Refusal(400, "We could not parse the JSON body of your request.", "invalid_json")
    return obj


def form(req: MockRequest) -> multipart.Form:
    """The request's multipart/form-data body, or a 400 saying what is wrong with it."""
    try:
        return multipart.parse_form(req.header(b"content-type"), req.body)
    except multipart.MultipartError as e:
        raise Refusal(400, f"Invalid multipart/form-data body: {e}", "invalid_multipart") from None


def required(obj: dict, name: str, kind=str):
    """obj[name], a non-empty value of `kind`, or OpenAI's 400 for a missing parameter."""
    v = obj.get(name)
    if v is None or v == "" or not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise Refusal(400, f"Missing required parameter: '{name}'.", "missing_required_parameter")
    return v


def reply(obj, status: int = 200, headers: bytes = b"") -> JsonReply:
    return JsonReply(status, orjson.dumps(obj), headers)


def page(req: MockRequest, items: list[dict], default_limit: int = 20, max_limit: int = 100,
         default_order: str = "desc") -> JsonReply:
    """A cursor page of `items` (oldest first) as OpenAI lists them: `limit`, `order` (asc|desc), `after` and
    `before` (ids); {"object": "list", "data", "first_id", "last_id", "has_more"}."""
    limit_text = req.query_param("limit")
    try:
        limit = default_limit if limit_text is None else int(limit_text)
    except ValueError:
        limit = -1
    if not 1 <= limit <= max_limit:
        raise Refusal(400, f"Invalid 'limit': expected an integer between 1 and {max_limit}.", "invalid_value")
    order = req.query_param("order") or default_order
    if order not in ("asc", "desc"):
        raise Refusal(400, "Invalid 'order': expected 'asc' or 'desc'.", "invalid_value")
    ordered = items if order == "asc" else items[::-1]
    after, before = req.query_param("after"), req.query_param("before")
    if after:   # an id no longer listed (deleted) ends the list
        ids = [i["id"] for i in ordered]
        ordered = ordered[ids.index(after) + 1:] if after in ids else []
    if before:  # the page just before that id
        ids = [i["id"] for i in ordered]
        ordered = ordered[:ids.index(before)] if before in ids else []
        data, has_more = ordered[-limit:], len(ordered) > limit
    else:
        data, has_more = ordered[:limit], len(ordered) > limit
    return reply({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                  "last_id": data[-1]["id"] if data else None, "has_more": has_more})
