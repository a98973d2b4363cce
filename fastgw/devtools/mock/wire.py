"""What a wire-format module (openai.py, anthropic.py, gemini.py, azure.py) gets from the mock server and gives
back, plus the canned text and the byte-template helpers that keep a request's cost to one %-format.

A handler takes a `MockRequest` and returns a `JsonReply`, a `StreamReply`, a `BytesReply` (any other content
type) or a `BodyStream` (a long body made piece by piece, written as the client takes it), or raises `Refusal` for
bad input (the server renders it with the route's error function, so each wire format answers in its own error
shape). `MockRequest.state` is a dict per mock server where stateful endpoints keep what they create (files...).
"""
from __future__ import annotations

import random
from urllib.parse import parse_qsl

import orjson

from fastgw.errors import error_body, error_type

# Sentinels rendered into templates then replaced by %d placeholders (no JSON value can collide: the renderers
# choose every number in the templates).
PROMPT_TOKENS, TOTAL_TOKENS = -7777771, -7777772
SSE = b"text/event-stream; charset=utf-8"

# The canned answer every wire format sends, one piece per content chunk (and per completion token).
PIECES = ("Hello", "!", " This", " is", " the", " fastgw", " mock", " upstream", " answering", " your",
          " request", " with", " canned", " tokens", ".")


def pieces(n: int, content: str | None = None) -> list[str]:
    """The first n pieces of the canned answer (cycling), or the given content cut into (at most) n pieces."""
    if content is not None:
        size = max(1, -(-len(content) // max(1, n)))
        return [content[i:i + size] for i in range(0, len(content), size)] or [content]
    return [PIECES[i % len(PIECES)] for i in range(n)]


class MockRequest:
    """One parsed request. `chunks`, `no_usage` and `echo_headers` come from the x-mock-* headers (or the
    server's defaults); the server itself handles the delays, resets, x-mock-status and x-mock-close."""

    __slots__ = ("method", "path", "query", "headers", "body", "chunks", "no_usage", "echo_headers", "state")

    def __init__(self, method: bytes, path: bytes, query: bytes, headers: list, body: bytes, chunks: int,
                 no_usage: bool, echo_headers: bool, state: dict | None = None):
        self.method = method
        self.path = path
        self.query = query              # what follows '?' in the target, b"" if none
        self.headers = headers          # [(lower-case name, value)] as bytes
        self.body = body
        self.chunks = chunks            # how many content pieces to answer with
        self.no_usage = no_usage        # never report usage
        self.echo_headers = echo_headers  # answer with the request headers as the content (OpenAI streams too)
        self.state = {} if state is None else state  # the server's: what stateful endpoints created

    def echoed_headers(self) -> str:
        """The request headers as a JSON object (repeated names joined with ", "), for x-mock-echo-headers."""
        echoed = {}
        for name, value in self.headers:
            n, v = name.decode("latin-1"), value.decode("latin-1")
            echoed[n] = f"{echoed[n]}, {v}" if n in echoed else v
        return orjson.dumps(echoed).decode()

    def header(self, name: bytes) -> bytes | None:
        """The value of the request header `name` (lower case), None when absent."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def bearer(self) -> bytes | None:
        """The token of an `authorization: Bearer <token>` header, None when there is none (or it is empty)."""
        value = self.header(b"authorization")
        if value is None or value[:7].lower() != b"bearer ":
            return None
        return value[7:].strip() or None

    def query_param(self, name: str) -> str | None:
        """The (decoded) value of the query parameter `name`, None when absent."""
        for n, v in parse_qsl(self.query.decode("latin-1"), keep_blank_values=True):
            if n == name:
                return v
        return None


class JsonReply:
    """A JSON response; `headers` are extra header lines, each ending in CRLF (e.g. b"retry-after: 1\r\n")."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: bytes = b""):
        self.status = status
        self.body = body
        self.headers = headers


class StreamReply:
    """A chunked response: `events` are already chunk-framed (see `frame`); the server adds the last chunk."""

    __slots__ = ("events", "content_type")

    def __init__(self, events: list[bytes], content_type: bytes = SSE):
        self.events = events
        self.content_type = content_type


class BytesReply:
    """A whole body of any content type (text/plain transcripts, a file's bytes, a PNG)."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: bytes, headers: bytes = b""):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class BodyStream:
    """A 200 body sent chunked, one chunk per piece of the `pieces` iterator, which makes each piece only when the
    server asks for it: the server waits while the client's socket is full, so a body of any size costs one piece
    of memory (speech audio, the content of files too big to keep)."""

    __slots__ = ("pieces", "content_type", "headers")

    def __init__(self, pieces, content_type: bytes, headers: bytes = b""):
        self.pieces = pieces
        self.content_type = content_type
        self.headers = headers


def seeded_pieces(seed: str, total: int, piece: int = 64 * 1024):
    """`total` deterministic pseudo-random bytes from `seed` (the same seed, the same bytes), `piece` at a time."""
    rng = random.Random(seed)
    while total > 0:
        n = min(piece, total)
        total -= n
        yield rng.randbytes(n)


class Refusal(Exception):
    """Bad input: answered with `status` and the route's error body."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def openai_error_body(status: int, message: str, code: str | None = None) -> bytes:
    """OpenAI's error JSON, rendered by fastgw.errors exactly as the gateway renders its own refusals. The
    default error function of a route; another wire format registers its own with the same signature, which
    may return a JsonReply instead of the body when its answer carries headers (Anthropic's retry-after)."""
    return error_body(message, error_type(status), code)


# -- byte templates ------------------------------------------------------------------------------------

def to_template(data: bytes) -> bytes:
    """`data` with the token sentinels turned into %-placeholders (and every other % escaped)."""
    return (data.replace(b"%", b"%%")
            .replace(str(PROMPT_TOKENS).encode(), b"%(p)d").replace(str(TOTAL_TOKENS).encode(), b"%(t)d"))


def template(obj) -> bytes:
    return to_template(orjson.dumps(obj))


def fill(tmpl: bytes, prompt: int, completion: int) -> bytes:
    return tmpl % {b"p": prompt, b"t": prompt + completion}


def frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj, event: str | None = None) -> bytes:
    data = b"data: " + orjson.dumps(obj) + b"\n\n"
    return (b"event: " + event.encode() + b"\n" + data) if event else data


class Canned:
    """A response rendered once: `body` (non-stream, a %-template) or `events` (stream: framed events, except
    the indexes in `templated`, which are unframed %-templates framed once filled)."""

    __slots__ = ("body", "events", "templated")

    def __init__(self, body: bytes | None = None, events: list | None = None, templated=()):
        self.body = body
        self.events = events
        self.templated = frozenset(templated)

    def body_for(self, prompt: int, completion: int) -> bytes:
        return fill(self.body, prompt, completion)

    def events_for(self, prompt: int, completion: int) -> list[bytes]:
        if not self.templated:
            return self.events
        events = list(self.events)
        for i in self.templated:
            events[i] = frame(fill(events[i], prompt, completion))
        return events


class TemplateCache:
    """`render(*key)` results by key, cleared when full: keys hold the model name, which clients choose."""

    __slots__ = ("render", "cache", "limit")

    def __init__(self, render, limit: int = 1024):
        self.render = render
        self.cache: dict = {}
        self.limit = limit

    def get(self, *key) -> Canned:
        c = self.cache.get(key)
        if c is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            c = self.cache[key] = self.render(*key)
        return c
