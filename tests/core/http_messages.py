"""Helpers shared by the HTTP parser tests: feeding a message whole, byte by byte or in random pieces, and
building chunked bodies."""


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
