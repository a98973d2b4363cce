"""The rest of the OpenAI API on the mock upstream (moderations, images, audio, files, uploads, batches, vector
stores, fine-tuning, models retrieve), driven by the real openai SDK over real sockets, as the gateway's tests
will drive it through the gateway; raw HTTP for the malformed requests and the speech download's backpressure."""
import base64
import hashlib
import random
import socket
import struct
import zlib

import httpx
import openai
import orjson
import pytest

from fastgw.devtools.mock import openai_media, store
from fastgw.devtools.mock.openai_media import speech_pieces
from tests.integration.test_mock import MockThread, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mock():
    m = MockThread()
    yield m
    m.close()


@pytest.fixture
def client(mock):
    c = openai.OpenAI(base_url=mock.base_url, api_key="sk-test", max_retries=0, timeout=30)
    yield c
    c.close()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and IHDR chunk (CRC included)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jsonl(*objs) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


# -- moderations ----------------------------------------------------------------------------------------

def test_moderations_flag_the_word_kill(client):
    r = client.moderations.create(model="omni-moderation-latest",
                                  input=["I will KILL this process", "a kind word", "killing time"])
    assert r.id.startswith("modr-") and r.model == "omni-moderation-latest"
    assert [x.flagged for x in r.results] == [True, False, True]
    first = r.results[0]
    assert first.categories.violence and not first.categories.hate and not first.categories.self_harm
    assert first.category_scores.violence > 0.5 > first.category_scores.harassment
    assert first.category_applied_input_types.violence == ["text"]
    one = client.moderations.create(input="hello")
    assert len(one.results) == 1 and not one.results[0].flagged
    parts = client.moderations.create(model="omni-moderation-latest", input=[
        {"type": "text", "text": "kill"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}])
    assert len(parts.results) == 1 and parts.results[0].flagged
    assert parts.results[0].category_applied_input_types.violence == ["text", "image"]
    assert parts.results[0].category_applied_input_types.hate == ["text"]
    with pytest.raises(openai.BadRequestError):
        client.moderations.create(input=[])


# -- images ---------------------------------------------------------------------------------------------

def test_images_generate_n_pngs_of_the_size_with_gpt_image_usage(client):
    r = client.images.generate(model="gpt-image-1", prompt="a grey square", n=3, size="1536x1024",
                               quality="low")
    assert len(r.data) == 3
    for image in r.data:
        assert png_size(base64.b64decode(image.b64_json)) == (1536, 1024)
        assert image.url is None
    assert r.size == "1536x1024" and r.quality == "low" and r.output_format == "png"
    u = r.usage
    assert u.input_tokens_details.text_tokens == len("a grey square") // 4 + 1
    assert u.input_tokens_details.image_tokens == 0
    assert u.output_tokens == 3 * 272 * 1536 // 1024
    assert u.total_tokens == u.input_tokens + u.output_tokens
    d = client.images.generate(model="dall-e-3", prompt="p", size="1024x1792")
    assert len(d.data) == 1 and d.usage is None and d.data[0].revised_prompt == "p"
    assert png_size(base64.b64decode(d.data[0].b64_json)) == (1024, 1792)
    for bad in ({"size": "big"}, {"n": 0}, {"n": 11}, {"response_format": "gif"}):
        with pytest.raises(openai.BadRequestError):
            client.images.generate(model="dall-e-2", prompt="p", **bad)


def test_images_url_points_at_the_png_on_the_mock(client):
    r = client.images.generate(model="dall-e-2", prompt="p", n=2, size="256x256", response_format="url")
    assert [d.b64_json for d in r.data] == [None, None]
    body = httpx.get(r.data[0].url).raise_for_status()
    assert body.headers["content-type"] == "image/png"
    assert png_size(body.content) == (256, 256)


def test_images_edit_and_variation_take_multipart_files(client):
    image = openai_media.png(64, 64)
    r = client.images.edit(model="gpt-image-1", image=[("a.png", image, "image/png"), ("b.png", image, "image/png")],
                           prompt="make it blue", size="1024x1024", n=2)
    assert len(r.data) == 2 and png_size(base64.b64decode(r.data[1].b64_json)) == (1024, 1024)
    assert r.usage.input_tokens_details.image_tokens == 2 * 65
    one = client.images.edit(image=("a.png", image, "image/png"), prompt="p", size="512x512",
                             mask=("m.png", image, "image/png"))
    assert png_size(base64.b64decode(one.data[0].b64_json)) == (512, 512)
    v = client.images.create_variation(image=("a.png", image, "image/png"), n=3, size="256x256")
    assert len(v.data) == 3 and png_size(base64.b64decode(v.data[2].b64_json)) == (256, 256)
    with pytest.raises(openai.BadRequestError):   # no prompt
        client.images.edit(image=("a.png", image, "image/png"), prompt="")


# -- audio ----------------------------------------------------------------------------------------------

def test_transcription_names_the_size_and_hash_of_the_exact_bytes(client):
    audio = random.Random(1).randbytes(100_000) + b"\r\n--not-a-boundary\r\n" + bytes(range(256))
    r = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio, "audio/wav"))
    assert r.text == f"Mock transcription of {len(audio)} bytes, sha256 {sha(audio)}."
    seconds = -(-len(audio) // (32 * 1024))
    assert r.usage.type == "duration" and r.usage.seconds == seconds == 4
    v = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="verbose_json",
                                           language="fr")
    assert v.duration == seconds and v.language == "fr" and v.text == r.text
    assert v.segments[0].end == seconds and v.segments[0].text == r.text
    text = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="text")
    assert text.strip() == r.text
    srt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:04,000\n") and r.text in srt
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:04.000\n") and r.text in vtt
    tokens = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", audio))
    assert tokens.usage.type == "tokens" and tokens.usage.input_token_details.audio_tokens == 10 * seconds
    assert tokens.usage.total_tokens == tokens.usage.input_tokens + tokens.usage.output_tokens


def test_translation(client):
    audio = b"\x00\x01" * 40_000
    r = client.audio.translations.create(model="whisper-1", file=("a.mp3", audio))
    assert r.text == f"Mock translation of {len(audio)} bytes, sha256 {sha(audio)}."
    v = client.audio.translations.create(model="whisper-1", file=("a.mp3", audio), response_format="verbose_json")
    assert v.duration == 3 and v.text == r.text


def test_audio_refuses_a_missing_file_model_or_bad_format(mock, client):
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x"), response_format="mp4")
    files = {"model": (None, "whisper-1")}
    r = httpx.post(mock.base_url + "/audio/transcriptions", files=files)
    assert r.status_code == 400 and "'file'" in r.json()["error"]["message"]
    r = httpx.post(mock.base_url + "/audio/transcriptions", files={"file": ("a.wav", b"abc")})
    assert r.status_code == 400 and "'model'" in r.json()["error"]["message"]


def test_speech_is_deterministic_audio_of_1kib_per_character(client):
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="hello",
                                                            response_format="wav") as r:
        assert r.headers["content-type"] == "audio/wav"
        assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
        assert r.headers["x-mock-body-bytes"] == str(5 * 1024)
        body = r.read()
    assert len(body) == 5 * 1024
    assert body == b"".join(speech_pieces("tts-1", "alloy", "wav", "hello", 5 * 1024))
    again = client.audio.speech.create(model="tts-1", voice="alloy", input="hello", response_format="wav").content
    other = client.audio.speech.create(model="tts-1", voice="alloy", input="hellO", response_format="wav").content
    assert again == body and other != body and len(other) == len(body)
    mp3 = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input="hi")
    assert mp3.headers["content-type"] == "audio/mpeg" and len(mp3.content) == 2048


def test_speech_bytes_header_streams_a_long_body_in_pieces(client, mock):
    size = 5 * 1024 * 1024 + 7
    writes = mock.stats.stream_writes
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="x", extra_headers={"x-mock-speech-bytes": str(size)}) as r:
        digest, total = hashlib.sha256(), 0
        for piece in r.iter_bytes():
            digest.update(piece)
            total += len(piece)
    expected = hashlib.sha256()
    for piece in speech_pieces("tts-1", "alloy", "mp3", "x", size):
        expected.update(piece)
    assert total == size and digest.hexdigest() == expected.hexdigest()
    assert mock.stats.stream_writes - writes >= size // (64 * 1024)   # one write per 64 KiB piece
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="x",
                                   extra_headers={"x-mock-speech-bytes": "lots"})
    empty = client.audio.speech.create(model="tts-1", voice="alloy", input="x",
                                       extra_headers={"x-mock-speech-bytes": "0"})
    assert empty.content == b""


def test_speech_waits_for_a_slow_reader(mock):
    """A client that stops reading stops the mock making the body: what it made stays within the socket
    buffers of what the client read (the body is never built whole), and the rest follows once it reads."""
    size = 512 * 1024 * 1024
    before = mock.stats.body_stream_bytes
    pauses = mock.stats.write_pauses
    with socket.create_connection(("127.0.0.1", mock.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        body = b'{"model":"tts-1","voice":"alloy","input":"x"}'
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n"
                  b"x-mock-speech-bytes: %d\r\ncontent-length: %d\r\n\r\n%s" % (size, len(body), body))
        received = len(s.recv(65536))
        wait_for(lambda: mock.stats.write_pauses > pauses)   # the transport's buffer filled: the mock waits
        made = mock.stats.body_stream_bytes - before
        assert made < 32 * 1024 * 1024, made                  # socket buffers and one piece, not 512 MiB
        while received < made:                                # the reader takes up again: the mock goes on
            chunk = s.recv(1 << 20)
            assert chunk
            received += len(chunk)
        wait_for(lambda: mock.stats.body_stream_bytes - before > made)
    # closing the connection mid-body ends the stream task
    wait_for(lambda: mock.stats.active_requests == 0)


# -- files, batches -------------------------------------------------------------------------------------

def test_file_upload_retrieve_content_list_batch_delete(client):
    requests = jsonl(
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}], "stream": True}},
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}})
    raw = client.files.with_raw_response.create(file=("requests.jsonl", requests), purpose="batch")
    assert raw.headers["x-mock-sha256"] == sha(requests)
    f = raw.parse()
    assert f.id.startswith("file-") and f.bytes == len(requests) and f.filename == "requests.jsonl"
    assert f.purpose == "batch" and f.status == "processed"
    assert client.files.retrieve(f.id) == f
    content = client.files.with_raw_response.content(f.id)
    assert content.content == requests and content.headers["x-mock-content"] == "stored"
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert f.id not in [x.id for x in client.files.list(purpose="fine-tune")]

    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"run": "1"})
    assert b.id.startswith("batch_") and b.status == "completed" and b.metadata == {"run": "1"}
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 2, 1)
    assert client.batches.retrieve(b.id) == b
    assert b.id in [x.id for x in client.batches.list()]
    out = [orjson.loads(line) for line in client.files.content(b.output_file_id).content.splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b"]
    for o, model in zip(out, ("gpt-4o-mini", "gpt-4o")):
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200
        completion = openai.types.chat.ChatCompletion.model_validate(o["response"]["body"])
        assert completion.model == model and completion.choices[0].message.content.startswith("Hello!")
    errors = [orjson.loads(line) for line in client.files.content(b.error_file_id).content.splitlines()]
    assert errors[0]["custom_id"] == "c" and errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert b.usage.output_tokens == 28 and b.usage.total_tokens == b.usage.input_tokens + 28

    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError) as info:
        client.files.retrieve(f.id)
    assert info.value.body["message"] == f"No such File object: {f.id}"
    assert f.id not in [x.id for x in client.files.list()]


def test_files_list_pages_and_orders(client, mock):
    fresh = MockThread()   # an empty store: the list is exactly these files
    try:
        c = openai.OpenAI(base_url=fresh.base_url, api_key="sk-test", max_retries=0)
        ids = [c.files.create(file=(f"f{i}.txt", b"x" * i), purpose="user_data").id for i in range(5)]
        first = c.files.list(limit=2, order="asc")
        assert [x.id for x in first.data] == ids[:2] and first.has_more
        assert [x.id for x in c.files.list(limit=2, order="asc")] == ids   # the SDK follows `after`
        assert [x.id for x in c.files.list()] == ids[::-1]
        assert [x.id for x in c.files.list(after=ids[3])] == ids[:3][::-1]
        assert not set(ids) & {x.id for x in openai.OpenAI(base_url=mock.base_url, api_key="k").files.list()}
        with pytest.raises(openai.BadRequestError):
            c.files.list(limit=0)
        c.close()
    finally:
        fresh.close()


def test_uploads_in_parts(client):
    data = random.Random(2).randbytes(300_000)
    up = client.uploads.create(bytes=len(data), filename="big.bin", mime_type="application/octet-stream",
                               purpose="user_data")
    assert up.id.startswith("upload_") and up.status == "pending" and up.file is None
    parts = [client.uploads.parts.create(up.id, data=data[i:i + 100_000]) for i in range(0, len(data), 100_000)]
    assert all(p.id.startswith("part_") and p.upload_id == up.id and p.object == "upload.part" for p in parts)
    with pytest.raises(openai.BadRequestError):   # the parts must add up to the declared size
        client.uploads.complete(up.id, part_ids=[p.id for p in parts[:2]])
    done = client.uploads.complete(up.id, part_ids=[p.id for p in parts])
    assert done.status == "completed" and done.file.bytes == len(data) and done.file.filename == "big.bin"
    assert client.files.content(done.file.id).content == data
    with pytest.raises(openai.BadRequestError):
        client.uploads.parts.create(up.id, data=b"more")
    other = client.uploads.create(bytes=3, filename="x", mime_type="text/plain", purpose="batch")
    assert client.uploads.cancel(other.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.uploads.complete(other.id, part_ids=["part_x"])
    with pytest.raises(openai.NotFoundError):
        client.uploads.cancel("upload_nope")


def test_a_file_over_the_kept_size_keeps_its_hash_and_size(client, monkeypatch):
    monkeypatch.setattr(store, "KEEP_BYTES", 1024)
    data = random.Random(3).randbytes(5000)
    f = client.files.create(file=("big.bin", data), purpose="user_data")
    r = client.files.with_raw_response.content(f.id)
    assert r.headers["x-mock-content"] == "regenerated" and r.headers["x-mock-sha256"] == sha(data)
    assert len(r.content) == 5000 and r.content != data
    assert r.content == client.files.content(f.id).content   # regenerated the same each time


def test_batch_held_then_cancelled(client):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": "x"}}
    f = client.files.create(file=("in.jsonl", jsonl(line)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                              extra_headers={"x-mock-hold": "1"})
    assert b.status == "in_progress" and b.request_counts.total == 1 and b.output_file_id is None
    c = client.batches.cancel(b.id)
    assert c.status == "cancelling" and c.cancelling_at
    r = client.batches.retrieve(b.id)
    assert r.status == "cancelled" and r.cancelled_at
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(b.id)
    done = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    out = orjson.loads(client.files.content(done.output_file_id).content)
    assert out["response"]["body"]["object"] == "list" and out["response"]["body"]["data"][0]["embedding"]


def test_batch_input_is_checked(client):
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    user = client.files.create(file=("x.jsonl", b"{}\n"), purpose="user_data")
    with pytest.raises(openai.BadRequestError):   # not a batch file
        client.batches.create(input_file_id=user.id, endpoint="/v1/chat/completions", completion_window="24h")
    bad = client.files.create(file=("x.jsonl", b'not json\n{"custom_id":"a","method":"POST","url":"/v1/embeddings",'
                                               b'"body":{}}\n'), purpose="batch")
    b = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    assert [(e.line, e.code) for e in b.errors.data] == [(1, "invalid_json_line"), (2, "mismatched_endpoint")]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=bad.id, endpoint="/v1/audio/speech", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


# -- vector stores --------------------------------------------------------------------------------------

def test_vector_store_with_files(client):
    a = client.files.create(file=("a.txt", b"alpha" * 100), purpose="assistants")
    b = client.files.create(file=("b.txt", b"beta"), purpose="assistants")
    vs = client.vector_stores.create(name="docs", file_ids=[a.id], metadata={"k": "v"},
                                     expires_after={"anchor": "last_active_at", "days": 7})
    assert vs.id.startswith("vs_") and vs.status == "completed" and vs.name == "docs"
    assert vs.file_counts.total == vs.file_counts.completed == 1 and vs.usage_bytes == 500
    assert vs.expires_after.days == 7 and vs.expires_at
    assert client.vector_stores.retrieve(vs.id).name == "docs"
    assert client.vector_stores.update(vs.id, name="renamed").name == "renamed"
    assert vs.id in [x.id for x in client.vector_stores.list()]
    vf = client.vector_stores.files.create(vector_store_id=vs.id, file_id=b.id, attributes={"lang": "en"})
    assert vf.id == b.id and vf.status == "completed" and vf.vector_store_id == vs.id and vf.usage_bytes == 4
    assert vf.attributes == {"lang": "en"} and vf.chunking_strategy.type == "static"
    assert {x.id for x in client.vector_stores.files.list(vector_store_id=vs.id)} == {a.id, b.id}
    assert client.vector_stores.files.retrieve(file_id=a.id, vector_store_id=vs.id).usage_bytes == 500
    assert client.vector_stores.retrieve(vs.id).file_counts.total == 2
    gone = client.vector_stores.files.delete(file_id=a.id, vector_store_id=vs.id)
    assert gone.deleted and gone.object == "vector_store.file.deleted"
    assert [x.id for x in client.vector_stores.files.list(vector_store_id=vs.id)] == [b.id]
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(file_id=a.id, vector_store_id=vs.id)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=vs.id, file_id="file-nope")
    assert client.vector_stores.delete(vs.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(vs.id)


# -- fine-tuning ----------------------------------------------------------------------------------------

def test_fine_tuning_job(client):
    training = jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    f = client.files.create(file=("train.jsonl", training), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id, suffix="demo", seed=7,
                                         hyperparameters={"n_epochs": 2})
    assert job.id.startswith("ftjob-") and job.status == "succeeded" and job.training_file == f.id
    assert job.fine_tuned_model == f"ft:gpt-4o-mini:fastgw-mock:demo:{job.id[-8:]}"
    assert job.hyperparameters.n_epochs == 2 and job.seed == 7 and job.finished_at
    assert job.trained_tokens == len(training) // 4 * 2
    assert client.fine_tuning.jobs.retrieve(job.id) == job
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))
    assert events[0].message == "The job has successfully completed" and events[0].object == "fine_tuning.job.event"
    assert len(events) > 3   # the SDK paged through them
    assert client.files.content(job.result_files[0]).content.startswith(b"step,train_loss\n")
    held = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id,
                                          extra_headers={"x-mock-hold": "1"})
    assert held.status == "queued" and held.fine_tuned_model is None
    assert client.fine_tuning.jobs.cancel(held.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(held.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-nope")
    assert info.value.body["message"] == "invalid training_file: file-nope"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


# -- models, bad input ----------------------------------------------------------------------------------

def test_models_retrieve(client):
    m = client.models.retrieve("gpt-4o-mini")
    assert m.id == "gpt-4o-mini" and m.object == "model" and m.owned_by


def raw_post(mock, path: str, content_type: str | None, body: bytes) -> httpx.Response:
    headers = {} if content_type is None else {"content-type": content_type}
    return httpx.post(mock.base_url + path, headers=headers, content=body)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    return error


def test_malformed_multipart_is_a_400(mock):
    good = (b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n"
            b"Content-Type: application/jsonl\r\n\r\n{}\r\n--XyZ--\r\n")
    assert raw_post(mock, "/files", "multipart/form-data; boundary=XyZ", good).status_code == 200
    cases = [
        ("multipart/form-data", good, "no boundary"),
        (None, good, "no Content-Type"),
        ("application/json", b"{}", "expected a multipart/form-data body"),
        ("multipart/form-data; boundary=XyZ", good[:-9], "ends before its closing boundary"),
        ("multipart/form-data; boundary=other", good, "does not contain its boundary"),
        ("multipart/form-data; boundary=XyZ", good.replace(b"Content-Disposition: form-data; ", b"X: "),
         "no Content-Disposition"),
        ("multipart/form-data; boundary=XyZ", good.replace(b"\r\n\r\nbatch", b"\r\nbatch"),
         "malformed multipart part header"),
        ("multipart/form-data; boundary=XyZ", b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n--XyZ--",
         "header does not end"),
        ("multipart/form-data; boundary=XyZ", b"--XyZ junk\r\n" + good[7:], "malformed multipart delimiter line"),
        ("multipart/form-data; boundary=XyZ", good.replace(b"form-data; name=\"purpose\"", b"form-data"),
         "not form-data with a name"),
        ("multipart/form-data; boundary=\"XyZ", good, "unterminated quoted string"),
        ("multipart/form-data; boundary=XyZ",
         b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ--\r\n",
         "Missing required parameter: 'file'"),
    ]
    for content_type, body, message in cases:
        error = assert_openai_error(raw_post(mock, "/files", content_type, body), 400)
        assert message in error["message"], (content_type, error)
    for path in ("/images/edits", "/images/variations", "/audio/transcriptions", "/audio/translations"):
        assert "no boundary" in assert_openai_error(raw_post(mock, path, "multipart/form-data", good), 400)["message"]


def test_unknown_ids_and_paths(mock):
    for method, path, message in (
            ("GET", "/files/file-nope", "No such File object: file-nope"),
            ("GET", "/files/file-nope/content", "No such File object: file-nope"),
            ("DELETE", "/files/file-nope", "No such File object: file-nope"),
            ("GET", "/batches/batch_nope", "No such batch: batch_nope"),
            ("POST", "/batches/batch_nope/cancel", "No such batch: batch_nope"),
            ("GET", "/vector_stores/vs_nope", "No such vector store: vs_nope"),
            ("GET", "/vector_stores/vs_nope/files", "No such vector store: vs_nope"),
            ("GET", "/fine_tuning/jobs/ftjob-nope/events", "No such fine-tuning job: ftjob-nope"),
            ("POST", "/uploads/upload_nope/complete", "No such Upload: upload_nope")):
        r = httpx.request(method, mock.base_url + path, json={})
        assert assert_openai_error(r, 404)["message"] == message
    for method, path in (("GET", "/files/x/y"), ("GET", "/files//content"), ("POST", "/batches/x/y"),
                         ("GET", "/fine_tuning/jobs/x/checkpoints/y")):
        assert assert_openai_error(httpx.request(method, mock.base_url + path), 404)["code"] in ("unknown_url", None)
    for method, path in (("PUT", "/files"), ("PATCH", "/files/file-x"), ("GET", "/uploads"),
                         ("DELETE", "/batches/b"), ("GET", "/audio/speech"), ("GET", "/moderations")):
        assert assert_openai_error(httpx.request(method, mock.base_url + path), 405)["message"].startswith("Method")
    bad_json = httpx.post(mock.base_url + "/batches", content=b"{nope", headers={"content-type": "application/json"})
    assert assert_openai_error(bad_json, 400)["code"] == "invalid_json"
