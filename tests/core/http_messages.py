"""Helpers shared by the HTTP parser tests: feeding a message whole, byte by byte or in random pieces, building
chunked bodies, and telling the chunk-size lines h11 refuses that RFC 9112 allows."""
import ast
import re


def split(data: bytes, cuts) -> list:
    """Cut data at the given (sorted, deduplicated) offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


def bytewise(data: bytes) -> list:
    return [data[i : i + 1] for i in range(len(data))]


def feeds(data, how, cuts):
    if how == "whole":
        return [data]
    if how == "bytes":
        return bytewise(data)
    return split(data, cuts)


def chunked(body: bytes, sizes, ext: bytes, trailers) -> bytes:
    """body as a chunked message body: chunks of the given sizes (the rest in one last chunk), each with the
    chunk extension `ext` (b"" for none), then the trailers."""
    out, i = [], 0
    for s in sizes:
        if i >= len(body):
            break
        part = body[i : i + max(1, s)]
        i += len(part)
        out.append(b"%x%s\r\n%s\r\n" % (len(part), ext, part))
    if i < len(body):
        out.append(b"%X\r\n%s\r\n" % (len(body) - i, body[i:]))
    out.append(b"0\r\n" + b"".join(b"%s: %s\r\n" % t for t in trailers) + b"\r\n")
    return b"".join(out)


# RFC 9112 section 7.1.1: chunk-size *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ) CRLF.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXT = rb"[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_CHUNK_LINE = re.compile(rb"[0-9A-Fa-f]+(?:" + _EXT + rb")*\r\n")
_CHUNK_LINE_LENIENT = re.compile(rb"[0-9A-Fa-f]+(?:" + _EXT + rb")*[ \t]*\r\n")   # responses: trailing OWS
_H11_CHUNK = "illegal chunk header: "


def rfc_chunk_line(h11_error: str, lenient: bool = False) -> bool:
    """Whether h11 refused a chunk-size line that RFC 9112 allows (h11 takes no whitespace before ";" and at
    most 20 digits; we accept what the RFC does, up to 15 significant digits). lenient: as for responses, also
    whitespace after the size or extensions."""
    if not h11_error.startswith(_H11_CHUNK) or not h11_error.endswith(")"):
        return False
    line = ast.literal_eval(h11_error[len(_H11_CHUNK):].removeprefix("bytearray(")[:-1])
    return (_CHUNK_LINE_LENIENT if lenient else _CHUNK_LINE).fullmatch(line) is not None
