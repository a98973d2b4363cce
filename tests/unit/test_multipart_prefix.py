"""fastgw.protocol.multipart.FormPrefix (the start of an upload: its text fields before the first file) against a
whole-body parser (the mock's, fastgw/devtools/mock/multipart.py, itself tested against httpx's encoder), on
random forms as the openai SDK sends them, fed in random pieces."""
import random

import httpx
import pytest

from fastgw.devtools.mock.multipart import parse_form
from fastgw.protocol.multipart import PREFIX_LIMIT, FormPrefix, MultipartError, boundary_of
from tests.unit.test_mock_multipart import encode


def feed_in_pieces(prefix: FormPrefix, body: bytes, rng: random.Random) -> bool:
    i = 0
    while i < len(body):
        n = rng.choice([1, 7, 100, 4096, len(body)])
        if prefix.feed(body[i:i + n]):
            return True
        i += n
    return prefix.feed(b"", True)


def fields_before_first_file(content_type, body) -> dict:
    out = {}
    for p in parse_form(content_type, body).parts:
        if p.filename is not None:
            break
        if len(p.data) <= 4096:
            out[p.name] = p.text()
    return out


@pytest.mark.parametrize("seed", range(300))
def test_fields_before_the_first_file_as_a_whole_body_parser_reads_them(seed):
    rng = random.Random(seed)
    content_type, body, _, _ = encode(rng)
    prefix = FormPrefix(boundary_of(content_type.encode()))
    assert feed_in_pieces(prefix, body, rng)
    assert prefix.fields == fields_before_first_file(content_type, body)
    assert body.startswith(prefix.data)              # what it read is the body's start, unchanged
    if "model" in prefix.fields:
        s, e = prefix.model_span
        assert prefix.data[s:e].decode("utf-8", "replace") == prefix.fields["model"]


def test_the_sdk_upload_shape_routes_on_its_model():
    req = httpx.Request("POST", "http://x/v1/audio/transcriptions", data={"model": "whisper-1", "language": "en"},
                        files={"file": ("a.wav", b"\0" * 1_000_000, "audio/wav")})
    body = req.read()
    prefix = FormPrefix(boundary_of(req.headers["content-type"].encode()))
    assert prefix.feed(body[:2000])                   # done long before the file's bytes
    assert prefix.fields == {"model": "whisper-1", "language": "en"} and len(prefix.data) == 2000


def test_a_field_after_the_file_or_past_the_limit_is_not_read():
    b = b"--q\r\ncontent-disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nDATA\r\n"
    b += b"--q\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nlate\r\n--q--\r\n"
    p = FormPrefix(b"q")
    assert p.feed(b) and p.fields == {} and p.model_span is None
    big = b"--q\r\ncontent-disposition: form-data; name=\"prompt\"\r\n\r\n" + b"x" * (PREFIX_LIMIT + 10)
    p = FormPrefix(b"q")
    assert p.feed(big) and p.fields == {}            # the limit: routing knows what it read by then


@pytest.mark.parametrize("body", [b"no boundary here" * 10, b"--q\r\ncontent-type: text/plain\r\n\r\nx\r\n--q--",
                                  b"--qX\r\n", b"preamble--q\r\n"], ids=["no-boundary", "no-name", "bad-delimiter",
                                                                          "delimiter-not-after-crlf"])
def test_not_multipart_is_an_error(body):
    with pytest.raises(MultipartError):
        FormPrefix(b"q").feed(body, True)


@pytest.mark.parametrize("seed", range(200))
def test_cut_or_corrupted_bodies_finish_or_raise(seed):
    rng = random.Random(50_000 + seed)
    content_type, body, _, _ = encode(rng)
    mutated = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        if rng.random() < 0.5 and mutated:
            del mutated[rng.randrange(len(mutated)):]
        elif mutated:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    prefix = FormPrefix(boundary_of(content_type.encode()))
    try:
        assert feed_in_pieces(prefix, bytes(mutated), rng)
    except MultipartError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in prefix.fields.items())


@pytest.mark.parametrize("content_type, boundary", [
    (b"multipart/form-data; boundary=abc", b"abc"), (b'Multipart/Form-Data; boundary="a b"', b"a b"),
    (b"multipart/form-data", None), (b"application/json", None), (None, None),
    (b"multipart/form-data; charset=utf-8; boundary=z9", b"z9")])
def test_boundary_of(content_type, boundary):
    assert boundary_of(content_type) == boundary
