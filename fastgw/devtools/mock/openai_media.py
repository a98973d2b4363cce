"""OpenAI's moderations, images and audio on the mock, each answer derived from the request so a test can check
the gateway forwarded it exactly:

  POST /v1/moderations (JSON: model, input: a string, strings, or text/image_url parts)  -> one result per string
      (one for a list of parts); an input containing the word "kill" (any case, any ending) is flagged
      "violence", every other category is clean
  POST /v1/images/generations (JSON: prompt, model, n, size, quality, response_format)   -> ImagesResponse
  POST /v1/images/edits (multipart: image or image[] files, mask, prompt, model, n, size, response_format)
  POST /v1/images/variations (multipart: image, model, n, size, response_format)
      n images of the requested size (WIDTHxHEIGHT; "auto" is 1024x1024): b64_json of a grey PNG of that size,
      or with response_format=url a URL on the mock itself (GET /mock/images/{W}x{H}.png serves it); GPT image
      models (gpt-image-*) report usage as OpenAI's do: text tokens len(prompt)//4 + 1, 65 image tokens per input
      image, and output tokens by quality and size (its table of 272/1056/4160 for a square low/medium/high)
  POST /v1/audio/transcriptions, /v1/audio/translations (multipart: file, model, response_format
      json|text|verbose_json|srt|vtt, prompt, language...): the text is "Mock transcription of N bytes, sha256
      HEX." (translation likewise) of the uploaded file's bytes; the audio lasts ceil(N / 32 KiB) seconds (at
      least 1): `usage` {"type": "duration", "seconds"} for whisper-1, tokens for the gpt-4o transcribe models
      (10 audio tokens a second); verbose_json has that `duration` and one segment; text, srt and vtt answer
      text/plain
  POST /v1/audio/speech (JSON: model, input, voice, response_format mp3|opus|aac|flac|wav|pcm): 1 KiB per
      character of input of deterministic bytes (speech_pieces), or the number of bytes in the request header
      `x-mock-speech-bytes: N`; streamed chunked in 64 KiB pieces under backpressure (wire.BodyStream), with the
      response header `x-mock-body-bytes: N`

Not done: streamed transcriptions (stream=true) and SSE speech (stream_format=sse) are refused with a 400.
"""
from __future__ import annotations

import base64
import hashlib
import re
import struct
import zlib

from fastgw.devtools.mock.store import form, json_body, new_id, now, reply, required
from fastgw.devtools.mock.wire import BodyStream, BytesReply, MockRequest, Refusal, seeded_pieces

# -- moderations ----------------------------------------------------------------------------------------

MODERATION_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                         "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
                         "sexual/minors", "violence", "violence/graphic")
_IMAGE_CATEGORIES = {"self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "violence",
                     "violence/graphic"}
_FLAGS = ((re.compile(r"\bkill", re.IGNORECASE), "violence"),)


def moderations(req: MockRequest):
    body = json_body(req)
    inp = body.get("input")
    if isinstance(inp, str):
        items = [(inp, False)]
    elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        items = [(x, False) for x in inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, dict) and x.get("type") in ("text", "image_url")
                                               for x in inp):
        text = " ".join(x["text"] for x in inp if x["type"] == "text" and isinstance(x.get("text"), str))
        items = [(text, any(x["type"] == "image_url" for x in inp))]
    else:
        raise Refusal(400, "Invalid 'input': expected a string, an array of strings, or an array of text and "
                           "image_url objects.", "invalid_value")
    model = body.get("model") or "omni-moderation-latest"
    if not isinstance(model, str):
        raise Refusal(400, "Invalid 'model': expected a string.", "invalid_value")
    return reply({"id": new_id("modr-"), "model": model, "results": [_moderation(t, img) for t, img in items]})


def _moderation(text: str, has_image: bool) -> dict:
    hits = {category for pattern, category in _FLAGS if pattern.search(text)}
    return {"flagged": bool(hits),
            "categories": {c: c in hits for c in MODERATION_CATEGORIES},
            "category_scores": {c: 0.9 if c in hits else 0.0001 for c in MODERATION_CATEGORIES},
            "category_applied_input_types": {
                c: ["text", "image"] if has_image and c in _IMAGE_CATEGORIES else ["text"]
                for c in MODERATION_CATEGORIES}}


# -- images ---------------------------------------------------------------------------------------------

_PNGS: dict[tuple[int, int], bytes] = {}
_SIZE = re.compile(r"([1-9][0-9]{1,3})x([1-9][0-9]{1,3})")
_OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160}   # gpt-image-1, a 1024x1024 image


def png(width: int, height: int) -> bytes:
    """A valid grey 8-bit greyscale PNG of that size (cached: a few hundred bytes to a few KB)."""
    key = (width, height)
    data = _PNGS.get(key)
    if data is None:
        if len(_PNGS) >= 32:
            _PNGS.clear()

        def chunk(kind: bytes, payload: bytes) -> bytes:
            return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

        rows = (b"\x00" + b"\x80" * width) * height   # filter byte 0, then the row's grey pixels
        header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit greyscale, no interlace
        data = _PNGS[key] = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                             + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    return data


def _size(size) -> tuple[str, int, int]:
    if size is None or size == "auto":
        return "1024x1024", 1024, 1024
    m = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if m is None or not (16 <= int(m[1]) <= 4096 and 16 <= int(m[2]) <= 4096):
        raise Refusal(400, f"Invalid value for 'size': {size!r}. Expected WIDTHxHEIGHT (16 to 4096) or 'auto'.",
                      "invalid_value")
    return size, int(m[1]), int(m[2])


def _int_param(value, name: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = low - 1
    if isinstance(value, bool) or not low <= n <= high:
        raise Refusal(400, f"Invalid value for '{name}': expected an integer from {low} to {high}.", "invalid_value")
    return n


def _images(req: MockRequest, model: str, prompt: str, n, size, response_format, quality, input_images: int):
    """The ImagesResponse of every images endpoint."""
    n = _int_param(n, "n", 1, 10, 1)
    size, width, height = _size(size)
    response_format = response_format or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise Refusal(400, f"Invalid value for 'response_format': {response_format!r}.", "invalid_value")
    if response_format == "url":
        host = (req.header(b"host") or b"localhost").decode("latin-1")
        image = {"url": f"http://{host}/mock/images/{width}x{height}.png", "b64_json": None}
    else:
        image = {"b64_json": base64.b64encode(png(width, height)).decode(), "url": None}
    image["revised_prompt"] = prompt if model.startswith("dall-e-3") else None
    out = {"created": now(), "data": [dict(image) for _ in range(n)]}
    if model.startswith("gpt-image"):
        quality = quality if quality in _OUTPUT_TOKENS else "medium"
        text_tokens = len(prompt) // 4 + 1
        image_tokens = 65 * input_images
        output_tokens = n * _OUTPUT_TOKENS[quality] * width * height // (1024 * 1024)
        out.update(background="opaque", output_format="png", quality=quality, size=size,
                   usage={"input_tokens": text_tokens + image_tokens, "output_tokens": output_tokens,
                          "total_tokens": text_tokens + image_tokens + output_tokens,
                          "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
                          "output_tokens_details": {"text_tokens": 0, "image_tokens": output_tokens}})
    return reply(out)


def image_generations(req: MockRequest):
    body = json_body(req)
    prompt = required(body, "prompt")
    model = body.get("model") or "dall-e-2"
    return _images(req, model, prompt, body.get("n"), body.get("size"), body.get("response_format"),
                   body.get("quality"), 0)


def image_edits(req: MockRequest):
    f = form(req)
    images = f.all("image", "image[]")
    if not images:
        raise Refusal(400, "Missing required parameter: 'image'.", "missing_required_parameter")
    prompt = f.value("prompt")
    if not prompt:
        raise Refusal(400, "Missing required parameter: 'prompt'.", "missing_required_parameter")
    model = f.value("model") or "dall-e-2"
    return _images(req, model, prompt, f.value("n"), f.value("size"), f.value("response_format"),
                   f.value("quality"), len(images))


def image_variations(req: MockRequest):
    f = form(req)
    if f.part("image") is None:
        raise Refusal(400, "Missing required parameter: 'image'.", "missing_required_parameter")
    return _images(req, f.value("model") or "dall-e-2", "", f.value("n"), f.value("size"),
                   f.value("response_format"), None, 1)


def image_file(req: MockRequest):
    """GET /mock/images/{W}x{H}.png: the image a response_format=url answer points to."""
    name = req.path[len(b"/mock/images/"):].decode("latin-1")
    if not name.endswith(".png"):
        raise Refusal(404, f"No such image: {name}", None)
    _, width, height = _size(name[:-4])
    return BytesReply(200, png(width, height), b"image/png")


# -- audio ----------------------------------------------------------------------------------------------

BYTES_PER_SECOND = 32 * 1024
SPEECH_BYTES_PER_CHAR = 1024
_SPEECH_TYPES = {"mp3": b"audio/mpeg", "opus": b"audio/opus", "aac": b"audio/aac", "flac": b"audio/flac",
                 "wav": b"audio/wav", "pcm": b"audio/pcm"}
_TEXT = b"text/plain; charset=utf-8"


def transcriptions(req: MockRequest):
    return _audio_text(req, "transcription", "transcribe")


def translations(req: MockRequest):
    return _audio_text(req, "translation", "translate")


def _audio_text(req: MockRequest, noun: str, task: str):
    f = form(req)
    audio = f.part("file")
    if audio is None:
        raise Refusal(400, "Missing required parameter: 'file'.", "missing_required_parameter")
    model = f.value("model")
    if not model:
        raise Refusal(400, "Missing required parameter: 'model'.", "missing_required_parameter")
    if f.value("stream") == "true":
        raise Refusal(400, "The mock does not stream transcriptions.", "unsupported_value")
    fmt = f.value("response_format") or "json"
    size = len(audio.data)
    text = f"Mock {noun} of {size} bytes, sha256 {hashlib.sha256(audio.data).hexdigest()}."
    seconds = max(1, -(-size // BYTES_PER_SECOND))
    if fmt == "text":
        return BytesReply(200, text.encode() + b"\n", _TEXT)
    if fmt in ("srt", "vtt"):
        return BytesReply(200, _subtitles(fmt, text, seconds).encode(), _TEXT)
    if fmt not in ("json", "verbose_json"):
        raise Refusal(400, f"Invalid value for 'response_format': {fmt!r}. Expected json, text, srt, "
                           f"verbose_json or vtt.", "invalid_value")
    out: dict = {"text": text}
    if fmt == "verbose_json":
        out = {"task": task, "language": f.value("language") or "english", "duration": float(seconds),
               "text": text, "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": float(seconds), "text": text,
                                           "tokens": [50364, 50365], "temperature": 0.0, "avg_logprob": -0.1,
                                           "compression_ratio": 1.0, "no_speech_prob": 0.01}]}
    if noun == "transcription":   # translations report no usage
        if model.startswith("whisper"):
            out["usage"] = {"type": "duration", "seconds": seconds}
        else:
            prompt_tokens = len(f.value("prompt") or "") // 4
            audio_tokens = 10 * seconds
            output_tokens = len(text) // 4
            out["usage"] = {"type": "tokens", "input_tokens": audio_tokens + prompt_tokens,
                            "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": prompt_tokens},
                            "output_tokens": output_tokens,
                            "total_tokens": audio_tokens + prompt_tokens + output_tokens}
    return reply(out)


def _subtitles(fmt: str, text: str, seconds: int) -> str:
    sep = "," if fmt == "srt" else "."
    span = f"00:00:00{sep}000 --> {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}{sep}000"
    if fmt == "srt":
        return f"1\n{span}\n{text}\n\n"
    return f"WEBVTT\n\n{span}\n{text}\n\n"


def speech_pieces(model: str, voice: str, response_format: str, text: str, size: int):
    """The bytes of a speech answer, 64 KiB at a time: deterministic in all the request's fields."""
    return seeded_pieces(f"speech|{model}|{voice}|{response_format}|{text}", size)


def speech(req: MockRequest):
    body = json_body(req)
    model = required(body, "model")
    text = required(body, "input")
    voice = body.get("voice")
    if isinstance(voice, dict):   # a custom voice: {"id": "voice_..."}
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice:
        raise Refusal(400, "Missing required parameter: 'voice'.", "missing_required_parameter")
    if len(text) > 4096:
        raise Refusal(400, "Invalid 'input': string too long. Expected a maximum length of 4096.",
                      "string_above_max_length")
    fmt = body.get("response_format") or "mp3"
    if fmt not in _SPEECH_TYPES:
        raise Refusal(400, f"Invalid value for 'response_format': {fmt!r}. Expected one of "
                           f"{', '.join(_SPEECH_TYPES)}.", "invalid_value")
    if body.get("stream_format") == "sse":
        raise Refusal(400, "The mock does not stream speech as SSE.", "unsupported_value")
    size = len(text) * SPEECH_BYTES_PER_CHAR
    override = req.header(b"x-mock-speech-bytes")
    if override is not None:
        if not override.strip().isdigit():
            raise Refusal(400, "x-mock-speech-bytes must be a number of bytes.", "invalid_value")
        size = int(override)
    return BodyStream(speech_pieces(model, voice, fmt, text, size), _SPEECH_TYPES[fmt],
                      b"x-mock-body-bytes: %d\r\n" % size)


ROUTES = (
    (b"POST", b"/v1/moderations", moderations),
    (b"POST", b"/v1/images/generations", image_generations),
    (b"POST", b"/v1/images/edits", image_edits),
    (b"POST", b"/v1/images/variations", image_variations),
    (b"GET", b"/mock/images/*", image_file),
    (b"POST", b"/v1/audio/transcriptions", transcriptions),
    (b"POST", b"/v1/audio/translations", translations),
    (b"POST", b"/v1/audio/speech", speech),
)
