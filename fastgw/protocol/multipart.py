"""The start of a multipart/form-data upload (RFC 7578): its text fields before the first file.

An upload is streamed to the upstream, never held whole; but routing needs its `model` field, which the OpenAI
SDKs send before the file (httpx writes the data fields, then the files). FormPrefix reads the body's first bytes
until the first part that is a file (or the closing delimiter, or `limit` bytes), keeping the text fields seen,
and where the `model` value is, so a deployment's model id can replace it. The bytes it read are sent on first,
then the rest of the body as it comes.

Plain Python: once per upload, on at most `limit` bytes.
"""
from __future__ import annotations

import re

PREFIX_LIMIT = 64 * 1024
_FIELD_MAX = 4096           # longer text fields (a long prompt) are not kept, only passed on
_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;,]{1,70}))', re.I)
_DISPOSITION = re.compile(rb"^content-disposition\s*:(.*)$", re.I | re.M)
_PARAM = re.compile(rb'(\w+)\*?\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]+))')


def boundary_of(content_type: bytes | None) -> bytes | None:
    """The boundary of a multipart/form-data content type; None when it is not one or has none."""
    if content_type is None or not content_type.lower().lstrip().startswith(b"multipart/form-data"):
        return None
    m = _BOUNDARY.search(content_type)
    return (m.group(1) or m.group(2)) if m else None


class MultipartError(ValueError):
    """The body is not multipart/form-data with the announced boundary."""


class FormPrefix:
    """feed(data) until it returns True; then `fields` (name -> text value) and `model_span` ((start, end) of the
    model value in `data`, or None) describe `data`, every byte fed so far."""

    def __init__(self, boundary: bytes, limit: int = PREFIX_LIMIT):
        self.delimiter = b"--" + boundary
        self.limit = limit
        self.data = b""
        self.fields: dict[str, str] = {}
        self.model_span = None
        self._pos = 0            # where the next part's delimiter is expected
        self._started = False

    def feed(self, data: bytes, end: bool = False) -> bool:
        """Take the next bytes of the body (`end`: there are no more). True once the fields before the first
        file are known. Raises MultipartError when the body does not start as multipart/form-data."""
        self.data += data
        while True:
            state = self._next_part()
            if state == "more":
                if end or len(self.data) >= self.limit:
                    if not self._started:
                        raise MultipartError("the body does not start with the boundary of its content type")
                    return True      # past the limit: what was read is all routing will know
                return False
            if state == "done":
                return True

    def _next_part(self) -> str:
        """Read one part at _pos: "more" (needs bytes), "done" (a file, or the end), "next" (a field read)."""
        d = self.data
        dl = self.delimiter
        if not self._started:
            i = d.find(dl)                       # a preamble before the first delimiter is allowed (and ignored)
            if i < 0 or len(d) < i + len(dl) + 2:
                return "more"
            if i > 0 and d[i - 2:i] != b"\r\n":
                raise MultipartError("the body does not start with the boundary of its content type")
            self._started = True
            self._pos = i
        p = self._pos
        if len(d) < p + len(dl) + 2:
            return "more"
        if d[p:p + len(dl)] != dl:
            raise MultipartError("a part does not start with the boundary")
        after = d[p + len(dl):p + len(dl) + 2]
        if after == b"--":
            return "done"                        # the closing delimiter: no file at all
        if after != b"\r\n":
            raise MultipartError("the boundary is not followed by CRLF")
        head_start = p + len(dl) + 2
        head_end = d.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            return "more"
        headers = d[head_start:head_end + 2]
        name, filename = _disposition(headers)
        if name is None:
            raise MultipartError("a part has no Content-Disposition name")
        if filename is not None:
            return "done"                        # the first file: everything before it is known
        value_start = head_end + 4
        value_end = d.find(b"\r\n" + dl, value_start)
        if value_end < 0:
            return "more"
        if value_end - value_start <= _FIELD_MAX:
            self.fields[name] = d[value_start:value_end].decode("utf-8", "replace")
            if name == "model":
                self.model_span = (value_start, value_end)
        self._pos = value_end + 2
        return "next"


def _disposition(headers: bytes):
    """(name, filename) of a part's Content-Disposition: form-data; filename None when it has none."""
    m = _DISPOSITION.search(headers)
    if m is None:
        return None, None
    params = {p.group(1).lower(): p.group(2) if p.group(2) is not None else p.group(3)
              for p in _PARAM.finditer(m.group(1))}
    name = params.get(b"name")
    filename = params.get(b"filename")
    return (name.decode("utf-8", "replace") if name is not None else None,
            filename.decode("utf-8", "replace") if filename is not None else None)
