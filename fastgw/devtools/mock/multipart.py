"""multipart/form-data bodies (RFC 7578 over RFC 2046), for the mock's upload endpoints (files, uploads' parts,
images edits, audio). Binary-safe: a part's data is the exact bytes between its head and the next delimiter.

The whole body is in memory (the server holds it); the parser only slices it, with bytes.find for the delimiters,
so a part of hundreds of MB is found at memchr speed and copied once. Anything malformed raises MultipartError
(a ValueError), which the endpoints answer with a 400.
"""
from __future__ import annotations

__all__ = ["MultipartError", "Part", "Form", "boundary_of", "parse", "parse_form"]


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data (the message says why)."""


class Part:
    """One form field: its `name`, the `filename` of a file field (None for a plain field), its `content_type`
    (None when the part has no Content-Type) and its `data`, the raw bytes."""

    __slots__ = ("name", "filename", "content_type", "data")

    def __init__(self, name: str, filename: str | None, content_type: str | None, data: bytes):
        self.name = name
        self.filename = filename
        self.content_type = content_type
        self.data = data

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class Form:
    """The parts of a form, looked up by field name (the first part with the name wins)."""

    def __init__(self, parts: list[Part]):
        self.parts = parts

    def part(self, *names: str) -> Part | None:
        """The first part named one of `names` (e.g. "image", "image[]")."""
        return next((p for p in self.parts if p.name in names), None)

    def all(self, *names: str) -> list[Part]:
        return [p for p in self.parts if p.name in names]

    def value(self, name: str, default: str | None = None) -> str | None:
        """The text of the plain field `name`, or `default` when it is absent."""
        p = self.part(name)
        return default if p is None else p.text()


def boundary_of(content_type: bytes | str | None) -> bytes:
    """The boundary parameter of a multipart/form-data Content-Type (RFC 2046: 1 to 70 characters)."""
    if content_type is None:
        raise MultipartError("the request has no Content-Type; expected multipart/form-data")
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    media, params = _header_params(content_type)
    if media != "multipart/form-data":
        raise MultipartError(f"expected a multipart/form-data body, got Content-Type {media or '(empty)'!r}")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("the multipart/form-data Content-Type has no boundary parameter")
    if len(boundary) > 70 or boundary.endswith(" "):
        raise MultipartError("invalid multipart boundary")
    return boundary.encode("latin-1")


def parse_form(content_type: bytes | str | None, body: bytes) -> Form:
    """The Form of a request: boundary from its Content-Type, parts from its body."""
    return Form(parse(body, boundary_of(content_type)))


def parse(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a multipart body. The preamble before the first delimiter and the epilogue after the closing
    one are ignored (RFC 2046 section 5.1.1); a body without the closing delimiter is malformed."""
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        first = body.find(b"\r\n" + delimiter)
        if first < 0:
            raise MultipartError("the multipart body does not contain its boundary")
        pos = first + 2 + len(delimiter)
    separator = b"\r\n" + delimiter   # a part's data ends at CRLF + the delimiter
    parts = []
    while True:
        if body.startswith(b"--", pos):   # the closing delimiter
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):   # only transport padding may follow a delimiter
            raise MultipartError("malformed multipart delimiter line")
        head_start = eol + 2
        if body.startswith(b"\r\n", head_start):     # a part with no header fields
            head, data_start = b"", head_start + 2
        else:
            head_end = body.find(b"\r\n\r\n", head_start)
            if head_end < 0:
                raise MultipartError("a multipart part's header does not end")
            head, data_start = body[head_start:head_end], head_end + 4
        data_end = body.find(separator, data_start)
        if data_end < 0:
            raise MultipartError("the multipart body ends before its closing boundary")
        parts.append(_part(head, body[data_start:data_end]))
        pos = data_end + len(separator)


def _part(head: bytes, data: bytes) -> Part:
    disposition = content_type = None
    for line in head.split(b"\r\n") if head else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise MultipartError("malformed multipart part header")
        name = name.lower()
        value = value.strip().decode("utf-8", "replace")
        if name == b"content-disposition":
            disposition = value
        elif name == b"content-type":
            content_type = value
    if disposition is None:
        raise MultipartError("a multipart part has no Content-Disposition")
    kind, params = _header_params(disposition)
    if kind != "form-data" or "name" not in params:
        raise MultipartError("a multipart part's Content-Disposition is not form-data with a name")
    return Part(params["name"], params.get("filename"), content_type, data)


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    """`type/sub; a=1; b="x; y"` -> ("type/sub", {"a": "1", "b": "x; y"}): names lower-cased, quoted strings
    unescaped (a backslash quotes the next character)."""
    n = len(value)
    semi = value.find(";")
    main = (value if semi < 0 else value[:semi]).strip().lower()
    params: dict[str, str] = {}
    i = n if semi < 0 else semi + 1
    while i < n:
        eq = value.find("=", i)
        if eq < 0:
            if value[i:].strip(" \t;"):
                raise MultipartError(f"malformed header parameters: {value!r}")
            break
        key = value[i:eq].strip().lower()
        i = eq + 1
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            out = []
            i += 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(value[i])
                i += 1
            if i >= n:
                raise MultipartError(f"unterminated quoted string in {value!r}")
            i += 1
            val = "".join(out)
        else:
            end = value.find(";", i)
            end = n if end < 0 else end
            val = value[i:end].strip()
            if " " in val or "\t" in val or '"' in val:   # an unquoted value is one token
                raise MultipartError(f"malformed header parameters: {value!r}")
            i = end
        if not key:
            raise MultipartError(f"malformed header parameters: {value!r}")
        params.setdefault(key, val)
        while i < n and value[i] in " \t":
            i += 1
        if i < n:
            if value[i] != ";":
                raise MultipartError(f"malformed header parameters: {value!r}")
            i += 1
    return main, params
