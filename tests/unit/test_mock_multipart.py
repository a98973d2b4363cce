"""The mock's multipart/form-data parser against httpx's encoder (the one the openai SDK sends with): every
random form it encodes parses back to the same fields and bytes; any cut or corrupted body parses or raises
MultipartError, nothing else."""
import random

import httpx
import pytest

from fastgw.devtools.mock.multipart import MultipartError, boundary_of, parse, parse_form

NASTY = [b"\r\n", b"--", b"\r\n--", b"\r\n\r\n", b"boundary", b"\x00", b"\xff", b'"', b"; name=", b"--\r\n"]


def random_bytes(rng: random.Random, boundary: bytes) -> bytes:
    """Binary data seeded with things that look like delimiters: the boundary itself without its CRLF, etc."""
    out = bytearray()
    for _ in range(rng.randrange(0, 8)):
        kind = rng.randrange(4)
        if kind == 0:
            out += rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:
            out += rng.choice(NASTY)
        elif kind == 2:
            out += b"--" + boundary      # the boundary not preceded by CRLF is data
        else:
            out += b"\n--" + boundary    # nor by a bare LF
    delimiter = b"\r\n--" + boundary     # but a form's data never holds its delimiter (RFC 2046)
    while delimiter in out:
        out = out.replace(delimiter, b"\n--" + boundary)
    return bytes(out)


def encode(rng: random.Random):
    boundary = rng.choice([b"b", b"XyZ", b"----fastgw" + str(rng.randrange(10**9)).encode(), b"a'+_-.0"])
    fields, files = [], []
    for i in range(rng.randrange(1, 6)):
        name = rng.choice(["purpose", "model", "n", "image[]", "x y", "caf\u00e9", f"f{i}"])
        if rng.random() < 0.5:
            fields.append((name, rng.choice(["", "batch", "a\r\nb", "\u00e9t\u00e9", "x" * 500])))
        else:
            filename = rng.choice(["a.wav", "dir/b.png", "with space.txt", "\u00fcber.bin", "q.jsonl"])
            files.append((name, (filename, random_bytes(rng, boundary), "application/octet-stream")))
    if not files:   # httpx sends a form without files urlencoded
        files.append(("file", ("a.bin", random_bytes(rng, boundary), "application/octet-stream")))
    request = httpx.Request("POST", "http://x/", data=dict(fields) if fields else None, files=files or None,
                            headers={"content-type": "multipart/form-data; boundary=" + boundary.decode()})
    return request.headers["content-type"], request.read(), dict(fields), files


@pytest.mark.parametrize("seed", range(300))
def test_httpx_forms_parse_back_exactly(seed):
    rng = random.Random(seed)
    content_type, body, fields, files = encode(rng)
    form = parse_form(content_type, body)
    plain = {p.name: p.text() for p in form.parts if p.filename is None}
    uploaded = [(p.name, (p.filename, p.data, p.content_type)) for p in form.parts if p.filename is not None]
    assert plain == fields
    assert uploaded == files


@pytest.mark.parametrize("seed", range(300))
def test_cut_or_corrupted_bodies_parse_or_raise_multipart_error(seed):
    rng = random.Random(10_000 + seed)
    content_type, body, _, _ = encode(rng)
    boundary = boundary_of(content_type)
    mutated = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        if rng.random() < 0.5 and mutated:
            del mutated[rng.randrange(len(mutated)):]
        elif mutated:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    try:
        parts = parse(bytes(mutated), boundary)
    except MultipartError:
        return
    assert all(isinstance(p.data, bytes) and isinstance(p.name, str) for p in parts)


@pytest.mark.parametrize("content_type, message", [
    (None, "no Content-Type"),
    ("text/plain", "expected a multipart/form-data body"),
    ("multipart/form-data", "no boundary"),
    ("multipart/form-data; boundary=", "no boundary"),
    ("multipart/form-data; boundary=" + "x" * 71, "invalid multipart boundary"),
    ('multipart/form-data; boundary="abc', "unterminated quoted string"),
    ("multipart/form-data; boundary=abc junk", "malformed header parameters"),
])
def test_bad_content_types(content_type, message):
    with pytest.raises(MultipartError, match=message):
        boundary_of(content_type)


def test_quoted_boundary_preamble_epilogue_and_a_part_without_headers():
    assert boundary_of('Multipart/Form-Data; charset=utf-8; Boundary="a \\"b\\""') == b'a "b"'
    body = (b"preamble\r\n--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n"
            b"--B  \r\n\r\nheaderless\r\n--B--\r\nepilogue")
    with pytest.raises(MultipartError, match="no Content-Disposition"):
        parse(body, b"B")
    parts = parse(body.replace(b"--B  \r\n\r\nheaderless\r\n", b""), b"B")
    assert [(p.name, p.data) for p in parts] == [("a", b"1")]
