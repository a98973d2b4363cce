"""The rest of the OpenAI API through the gateway (issue 15): the official openai SDK against `fastgw serve`
against the built-in mock, which answers those endpoints (moderations, images, audio, files, uploads, batches,
vector stores, fine-tuning). Uploads are streamed, binary answers relayed as they come, resources stay with the
deployment and the consumer that made them."""
from __future__ import annotations

import hashlib
import os
import socket

import httpx
import openai
import orjson
import pytest

from fastgw.devtools.mock.openai_media import speech_pieces
from fastgw.policies.auth.policy import hash_key
from tests.integration.conftest import MockThread, model_config, wait_for

KEYS = {"alice": "sk-alice-4d1c", "bob": "sk-bob-92e0"}


def client(gw, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base + "/v1", api_key=key, max_retries=0, timeout=60)


def auth_policies(tmp_path) -> str:
    d = tmp_path / "policies"
    d.mkdir()
    consumers = "".join(f'[[consumers]]\nname = "{n}"\nkeys = ["{hash_key(k)}"]\n' for n, k in KEYS.items())
    (d / "10-auth.toml").write_text('policy = "key-auth"\n' + consumers)
    return f'policies_dir = "{d}"\n'


def jsonl(*lines) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


BATCH_LINE = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}


def test_the_openai_api_through_the_default_route(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*"))
    c = client(gw)
    mod = c.moderations.create(model="omni-moderation-latest", input=["hello", "I will kill it"])
    assert [r.flagged for r in mod.results] == [False, True]

    img = c.images.generate(model="gpt-image-1", prompt="a cat", n=2, size="1024x1024")
    assert len(img.data) == 2 and img.data[0].b64_json and img.usage.output_tokens > 0

    audio = os.urandom(200_000)
    text = c.audio.transcriptions.create(model="whisper-1", file=("talk.wav", audio, "audio/wav"))
    assert text.text == f"Mock transcription of {len(audio)} bytes, sha256 {hashlib.sha256(audio).hexdigest()}."

    speech = c.audio.speech.create(model="tts-1", voice="alloy", input="Hello there")
    assert speech.content == b"".join(speech_pieces("tts-1", "alloy", "mp3", "Hello there", 11 * 1024))

    f = c.files.create(file=("in.jsonl", jsonl(BATCH_LINE)), purpose="batch")
    assert c.files.retrieve(f.id).bytes == f.bytes
    assert f.id in [x.id for x in c.files.list()]
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = c.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 1
    out = c.files.content(batch.output_file_id).content
    assert orjson.loads(out.splitlines()[0])["response"]["status_code"] == 200

    vs = c.vector_stores.create(name="docs", file_ids=[f.id])
    assert c.vector_stores.files.retrieve(f.id, vector_store_id=vs.id).status == "completed"
    train = c.files.create(file=("train.jsonl", jsonl({"messages": [{"role": "user", "content": "hi"},
                                                                     {"role": "assistant", "content": "hello"}]})),
                           purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train.id)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert c.files.delete(f.id).deleted

    lines = wait_for(lambda: len(got := gw.access_lines()) >= 16 and {line["path"]: line for line in got},
                     what="the access log lines")
    assert lines["/v1/audio/transcriptions"]["status"] == 200
    assert lines["/v1/audio/transcriptions"]["bytes_in"] > len(audio)        # the whole upload, streamed
    assert lines["/v1/audio/speech"]["bytes_out"] > 11 * 1024
    assert lines["/v1/moderations"]["model"] == "omni-moderation-latest"


def test_a_consumer_never_reaches_another_consumers_resources(tmp_path, mock, start_gateway):
    gw = start_gateway(auth_policies(tmp_path) + model_config(mock.url, name="*"), workers=2)
    alice, bob = client(gw, KEYS["alice"]), client(gw, KEYS["bob"])
    f = alice.files.create(file=("in.jsonl", jsonl(BATCH_LINE)), purpose="batch")
    mine = bob.files.create(file=("b.jsonl", jsonl(BATCH_LINE)), purpose="batch")
    for _ in range(6):                       # several connections: both workers answer, from one shared map
        assert client(gw, KEYS["alice"]).files.retrieve(f.id).id == f.id
    for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id), lambda: bob.files.delete(f.id),
                 lambda: bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "resource_not_found"
    assert [x.id for x in bob.files.list()] == [mine.id]
    assert f.id in [x.id for x in alice.files.list()] and mine.id not in [x.id for x in alice.files.list()]
    batch = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    output = alice.batches.retrieve(batch.id).output_file_id
    assert alice.files.content(output).content          # made by the upstream for alice's batch: hers
    with pytest.raises(openai.NotFoundError):
        bob.files.content(output)
    with pytest.raises(openai.NotFoundError):            # an id the gateway never saw made: unknown, refused
        alice.files.retrieve("file-made-elsewhere")
    assert alice.files.delete(f.id).deleted
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-nobody").files.list()


def test_a_resource_is_used_where_it_was_made(tmp_path, start_gateway):
    # Two deployments in round robin: a file exists only on the mock that stored it, and every later request
    # naming it goes there.
    a, b = MockThread(), MockThread()
    try:
        gw = start_gateway(f"""
[[models]]
name = "*"
[[models.deployments]]
url = "{a.url}"
[[models.deployments]]
url = "{b.url}"
""")
        c = client(gw)
        files = [c.files.create(file=(f"{i}.jsonl", jsonl(BATCH_LINE)), purpose="batch") for i in range(4)]
        for f in files * 2:
            assert c.files.retrieve(f.id).id == f.id
            assert c.files.content(f.id).content == jsonl(BATCH_LINE)
        assert len(a.server.mock_state["openai"].files) == len(b.server.mock_state["openai"].files) == 2
    finally:
        a.stop()
        b.stop()


def test_upload_model_field_routes_and_is_renamed(tmp_path, mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*") + f"""
[[models]]
name = "house-transcriber"
[[models.deployments]]
url = "{mock.url}"
model = "gpt-4o-transcribe"
""")
    audio = os.urandom(70_000)
    t = client(gw).audio.transcriptions.create(model="house-transcriber", file=("a.wav", audio))
    assert hashlib.sha256(audio).hexdigest() in t.text
    assert t.usage.type == "tokens"                     # the mock saw gpt-4o-transcribe, not whisper-1's duration
    line = wait_for(lambda: [x for x in gw.access_lines() if x["path"] == "/v1/audio/transcriptions"],
                    what="its access log line")[-1]
    assert line["model"] == "house-transcriber"


def test_large_upload_and_download_stream_through(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*"))
    data = os.urandom(40 * 1024 * 1024)
    with httpx.Client(base_url=gw.base, timeout=120) as h:
        r = h.post("/v1/files", files={"file": ("big.bin", data)}, data={"purpose": "user_data"})
        assert r.status_code == 200 and r.headers["x-mock-sha256"] == hashlib.sha256(data).hexdigest()
        size = 64 * 1024 * 1024
        with h.stream("POST", "/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "x"},
                      headers={"x-mock-speech-bytes": str(size)}) as r:
            got = sum(len(piece) for piece in r.iter_bytes())
        assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg" and got == size


def raw(gw, data: bytes) -> bytes:
    """Send `data`, read until the gateway closes. A refusal may close before all of `data` was read: the reset
    that follows is expected (the answer came first)."""
    out = b""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while piece := s.recv(65536):
                out += piece
        except ConnectionResetError:
            pass
    return out


def test_bad_uploads_are_clear_errors(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*") + "\n[passthrough]\nmax_upload_bytes = 1000000\n")
    cases = [
        (b"content-type: multipart/form-data\r\ncontent-length: 5\r\n\r\nhello", b"400", b"invalid_multipart"),
        (b"content-type: multipart/form-data; boundary=zz\r\ncontent-length: 12\r\n\r\nnot multipart",
         b"400", b"invalid_multipart"),
        (b"content-type: multipart/form-data; boundary=zz\r\ncontent-length: 2000000\r\n\r\n", b"413",
         b"request_too_large"),
        (b"content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n"
         + b"fffff\r\n" + b"x" * 0xfffff + b"\r\n", b"413", b"request_too_large"),
    ]
    for head, status, code in cases:
        out = raw(gw, b"POST /v1/files HTTP/1.1\r\nhost: a\r\nconnection: close\r\n" + head)
        assert out.startswith(b"HTTP/1.1 " + status) and code in out, out[:300]
    out = raw(gw, b"OPTIONS /v1/files HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405") and b"method_not_allowed" in out
    assert client(gw).moderations.create(model="m", input="still serving").results    # the worker is fine
    assert "Traceback" not in gw.ops_log()


def test_an_id_an_answer_only_mentions_is_not_given_to_the_requester(tmp_path, start_gateway, monkeypatch):
    # A GET's answer naming an id the gateway never saw made (an upstream's listing, a client's own JSON) must not
    # make that id the requester's: under unknown_resources = "deny" it stays refused. Only what a POST created (and
    # a batch's or job's produced files) is recorded.
    from tests.integration import faulty_upstream as fu

    def echo_id(up, conn, req, cid):
        conn.sendall(fu.json_response(orjson.dumps({"id": req.headers["x-echo-id"], "object": "file"})))
        return True

    monkeypatch.setitem(fu.FAULTS, "echo-id", echo_id)
    up = fu.FaultyUpstream()
    try:
        gw = start_gateway(auth_policies(tmp_path) + model_config(up.url, name="*"))
        h = httpx.Client(base_url=gw.base, headers={"authorization": f"Bearer {KEYS['bob']}"}, timeout=10)
        r = h.get("/v1/files/list-ish", headers={"x-fault": "echo-id", "x-echo-id": "file-never-made-here"})
        assert r.status_code == 200 and r.json()["id"] == "file-never-made-here"
        r = h.get("/v1/files/file-never-made-here", headers={"x-fault": "echo-id", "x-echo-id": "file-x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "resource_not_found"
        r = h.post("/v1/files", headers={"x-fault": "echo-id", "x-echo-id": "file-made-by-bob"},
                   files={"file": ("a.txt", b"hi")}, data={"purpose": "user_data"})
        assert r.status_code == 200                      # a POST's answer: created, bob's from now on
        r = h.get("/v1/files/file-made-by-bob", headers={"x-fault": "echo-id", "x-echo-id": "file-made-by-bob"})
        assert r.status_code == 200
    finally:
        up.stop()
