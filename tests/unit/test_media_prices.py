"""Pricing of the non-chat endpoints (fastgw/policies/budget/media.py): images, speech, transcriptions and
translations, moderations and embeddings, on requests and answers shaped as OpenAI's API sends them (each answer
is checked against the openai SDK's own response type), and the budget policy charging them."""
import json
import math
import random
import time

import openai.types as ot
import orjson
import pytest
from openai.types import audio as oa

from fastgw.errors import GatewayError
from fastgw.policies import FieldError
from fastgw.policies.budget import media
from fastgw.policies.budget.media import AUDIO_BYTES_PER_SECOND, SPEECH_AUDIO_TOKENS_PER_TEXT_TOKEN, Charge
from fastgw.policies.budget.policy import Budget, BudgetRule, Config, Price
from fastgw.policies.budget.prices import KNOWN_MODELS, PriceTable
from fastgw.policies.ratelimit.policy import Config as RLConfig, RateLimit, Rule
from fastgw.policies.usage import count_input, fill_counted_usage
from fastgw.protocol.http import HEAD, RequestParser
from fastgw.proxy.exchange import Exchange
from fastgw.tokens.exact import count_text

T = PriceTable()


def new_exchange(path, model="", headers=None):
    """A real Exchange whose parser has parsed a real request head with these headers (content-length
    included: multipart uploads are priced from it at admission), its body not read yet."""
    lines = [f"POST {path} HTTP/1.1", "host: gw"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    if not any(k.lower() == "content-length" for k in headers or {}):
        lines.append("content-length: 0")
    p = RequestParser()
    p.feed(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    assert p.next_event() == HEAD
    ex = Exchange("req-1", "127.0.0.1", b"POST", path, p, time.perf_counter())
    ex.model = model
    return ex


def exchange(make_exchange, path, *, model="", body=None, form=None, answer=None, status=200, headers=None,
             bytes_in=0, shape=None):
    """An Exchange as the pass-through leaves it: the request's JSON body or multipart form fields, and a 2xx
    JSON answer kept whole (validated against the SDK type `shape` first: the shapes are OpenAI's)."""
    ex = new_exchange(path, model, headers)
    ex.body = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else b""
    ex.form = form
    if answer is not None:
        if shape is not None:
            shape.model_validate(answer)
        ex.response_body = orjson.dumps(answer)
    ex.status = status
    ex.bytes_in = bytes_in or len(ex.body)
    return ex


def charge(ex, prices=T):
    return media.units_and_cost(ex, prices)


# -- the price table ----------------------------------------------------------------------------------------------

def test_media_prices_and_snapshots():
    assert T.media("dall-e-3").per_image["hd/1792x1024"] == 0.12
    assert T.media("dall-e-2").per_image["256x256"] == 0.016
    assert T.media("tts-1-hd-1106").per_million_characters == 30.0         # a snapshot finds its family
    assert T.media("tts-1-1106").per_million_characters == 15.0
    assert T.media("gpt-image-1-mini-2025-10-06").media_input == 2.5       # not gpt-image-1's 10.0
    assert T.media("whisper-1").per_minute == 0.006
    assert T.media("gpt-4o") is None and T.media("tts-10") is None
    assert T.lookup("gpt-4o-mini-tts-2025-12-15") == (0.60, 12.00)          # not gpt-4o-mini's prices
    assert T.lookup("gpt-4o-mini-transcribe") == (1.25, 5.00)
    assert T.lookup("omni-moderation-latest") == (0.0, 0.0) == T.lookup("text-moderation-007")
    assert {"dall-e-3", "whisper-1", "tts-1", "gpt-image-1", "gpt-4o"} <= KNOWN_MODELS


@pytest.mark.parametrize("model,quality,size,usd", [
    ("dall-e-3", "", "", 0.040),                      # the API's defaults: standard, 1024x1024
    ("dall-e-3", "hd", "", 0.080),
    ("dall-e-3", "standard", "1792x1024", 0.080),
    ("dall-e-3", "hd", "1024x1792", 0.120),
    ("dall-e-3", "HD", "1024X1792", 0.120),
    ("dall-e-3", "", "640x480", 0.120),               # a size the table lacks: the dearest, an upper bound
    ("dall-e-2", "standard", "512x512", 0.018),       # one quality: the quality is not part of the key
    ("dall-e-2", "", "", 0.020),
    ("gpt-image-1", "low", "1024x1024", 0.011),
    ("gpt-image-1", "medium", "1536x1024", 0.063),
    ("gpt-image-1", "low", "auto", 0.016),            # auto: the dearest size of that quality
    ("gpt-image-1", "", "", 0.25),                    # auto, auto (the defaults): the dearest image
    ("gpt-image-1-mini", "high", "1024x1024", 0.036),
])
def test_image_price(model, quality, size, usd):
    assert media.image_price(T.media(model), quality, size) == pytest.approx(usd)


# -- images ---------------------------------------------------------------------------------------------------------

def test_dall_e_3_by_count_size_and_quality(make_exchange):
    body = {"model": "dall-e-3", "prompt": "a white siamese cat", "n": 1, "size": "1024x1792", "quality": "hd"}
    answer = {"created": 1713833628, "data": [{"url": "https://example.invalid/1.png",
                                                "revised_prompt": "A white Siamese cat..."}]}
    ex = exchange(make_exchange, "/v1/images/generations", model="dall-e-3", body=body, answer=answer,
                  shape=ot.ImagesResponse)
    assert media.estimate(ex, T) == pytest.approx(0.12)
    assert charge(ex) == Charge("images", 1, pytest.approx(0.12), True)


def test_dall_e_2_counts_the_images_the_answer_holds(make_exchange):
    body = {"model": "dall-e-2", "prompt": "p", "n": 3, "size": "512x512", "response_format": "b64_json"}
    answer = {"created": 1, "data": [{"b64_json": "aGk="}, {"b64_json": "aGk="}]}     # two of the three asked
    ex = exchange(make_exchange, "/v1/images/generations", model="dall-e-2", body=body, answer=answer,
                  shape=ot.ImagesResponse)
    assert media.estimate(ex, T) == pytest.approx(3 * 0.018)
    assert charge(ex) == Charge("images", 2, pytest.approx(2 * 0.018), True)


def test_gpt_image_1_by_its_usage_tokens(make_exchange):
    # The API reference's example answer of gpt-image-1.
    answer = {"created": 1713833628, "data": [{"b64_json": "aGk="}], "background": "transparent",
              "output_format": "png", "size": "1024x1024", "quality": "high",
              "usage": {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
                        "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}}
    ex = exchange(make_exchange, "/v1/images/edits", model="gpt-image-1",
                  form={"model": "gpt-image-1", "prompt": "add a hat", "quality": "high", "size": "1024x1024"},
                  answer=answer, shape=ot.ImagesResponse)
    # text in $5, image in $10, image out $40 per million
    assert charge(ex) == Charge("tokens", 100, pytest.approx((10 * 5 + 40 * 10 + 50 * 40) / 1e6), True)
    assert media.estimate(ex, T) == pytest.approx(0.167)     # admission: the published price per image
    del answer["usage"]["input_tokens_details"]              # no breakdown: the prompt is text
    ex.response_body = orjson.dumps(answer)
    assert charge(ex).usd == pytest.approx((50 * 5 + 50 * 40) / 1e6)


def test_gpt_image_1_without_usage_is_priced_per_image_of_the_answers_quality(make_exchange):
    answer = {"created": 1, "data": [{"b64_json": "aGk="}] * 2, "size": "1536x1024", "quality": "low"}
    ex = exchange(make_exchange, "/v1/images/generations", model="gpt-image-1",
                  body={"model": "gpt-image-1", "prompt": "p", "n": 2}, answer=answer, shape=ot.ImagesResponse)
    assert media.estimate(ex, T) == pytest.approx(2 * 0.25)     # quality and size auto: the dearest
    assert charge(ex) == Charge("images", 2, pytest.approx(2 * 0.016), True)


def test_image_upload_fields_come_from_the_form(make_exchange):
    ex = exchange(make_exchange, "/v1/images/variations", model="dall-e-2",
                  form={"model": "dall-e-2", "n": "2", "size": "256x256"},
                  answer={"created": 1, "data": [{"url": "u1"}, {"url": "u2"}]}, shape=ot.ImagesResponse)
    assert ex.body == b"" and media.estimate(ex, T) == pytest.approx(2 * 0.016)
    assert charge(ex) == Charge("images", 2, pytest.approx(2 * 0.016), True)


@pytest.mark.parametrize("n,images", [("3", 3), (" 4 ", 4), ("abc", 1), ("", 1), ("-2", 1), ("1000", 10),
                                      (2, 2), (True, 1), (2.5, 1), (None, 1), ([3], 1), (b"1" + b"0" * 30, 10),
                                      (b"-" + b"9" * 30, 1)])
def test_image_count_of_the_request(make_exchange, n, images):
    fields = {"model": "dall-e-2", "prompt": "p", "n": "N"}
    body = orjson.dumps(fields).replace(b'"N"', n if isinstance(n, bytes) else orjson.dumps(n))
    ex = exchange(make_exchange, "/v1/images/generations", body=body)        # the model from the body
    assert media.estimate(ex, T) == pytest.approx(images * 0.020)
    ex.response_body = None                                                  # a 2xx answer we did not keep
    assert charge(ex) == Charge("images", images, pytest.approx(images * 0.020), False)


def test_an_unpriced_image_model_costs_nothing(make_exchange):
    ex = exchange(make_exchange, "/v1/images/generations", model="my-diffusion",
                  body={"model": "my-diffusion", "prompt": "p", "n": 2}, answer={"created": 1, "data": [{}]})
    assert media.estimate(ex, T) == 0.0 and charge(ex) == Charge("images", 1, 0.0, True)


# -- speech ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,per_million", [("tts-1", 15.0), ("tts-1-hd", 30.0), ("tts-1-hd-1106", 30.0)])
def test_speech_by_characters(make_exchange, model, per_million):
    text = "Today is a wonderful day to build something people love! " * 20 + "naïve café 東京"
    body = {"model": model, "input": text, "voice": "alloy", "response_format": "mp3"}
    ex = exchange(make_exchange, "/v1/audio/speech", model=model, body=body)      # the answer is audio bytes
    assert ex.response_body is None
    assert media.estimate(ex, T) == pytest.approx(len(text) * per_million / 1e6)
    assert charge(ex) == Charge("characters", len(text), pytest.approx(len(text) * per_million / 1e6), True)


def test_speech_of_a_token_priced_model_counts_its_input_and_estimates_its_audio(make_exchange):
    text, instructions = "The quick brown fox jumps over the lazy dog. " * 30, "Speak in a cheerful tone."
    ex = exchange(make_exchange, "/v1/audio/speech", model="gpt-4o-mini-tts",
                  body={"model": "gpt-4o-mini-tts", "input": text, "voice": "coral", "instructions": instructions})
    n = count_text(text, "o200k_base") + count_text(instructions, "o200k_base")
    out = n * SPEECH_AUDIO_TOKENS_PER_TEXT_TOKEN
    c = charge(ex)
    assert c == Charge("tokens", n + out, pytest.approx((n * 0.60 + out * 12.00) / 1e6), False)
    assert media.estimate(ex, T) == pytest.approx(c.usd)
    # OpenAI's own estimate for it is $0.015 a minute; ~1,300 characters is about a minute and a half of speech.
    assert 0.01 < c.usd < 0.04


# -- transcriptions and translations -----------------------------------------------------------------------------

def test_whisper_by_the_duration_usage(make_exchange):
    answer = {"text": "Imagine the wildest idea that you've ever had...", "usage": {"type": "duration", "seconds": 90}}
    ex = exchange(make_exchange, "/v1/audio/transcriptions", model="whisper-1",
                  form={"model": "whisper-1", "response_format": "json"}, answer=answer, bytes_in=3_000_000,
                  shape=oa.Transcription)
    assert charge(ex) == Charge("seconds", 90.0, pytest.approx(0.009), True)


def test_whisper_verbose_json_by_its_duration(make_exchange):
    answer = {"task": "transcribe", "language": "english", "duration": 8.470000267028809,
              "text": "The beach was a popular spot on a hot summer day.",
              "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": 3.32, "text": " The beach was a popular spot",
                            "tokens": [50364, 440], "temperature": 0.0, "avg_logprob": -0.28, "compression_ratio": 1.2,
                            "no_speech_prob": 0.009}]}
    ex = exchange(make_exchange, "/v1/audio/translations", model="whisper-1",
                  form={"model": "whisper-1", "response_format": "verbose_json"}, answer=answer,
                  shape=oa.TranslationVerbose)
    assert charge(ex) == Charge("seconds", pytest.approx(8.47), pytest.approx(8.47 / 60 * 0.006), True)


def test_gpt_4o_transcribe_by_its_token_usage(make_exchange):
    # The API reference's example answer (json) of gpt-4o-transcribe.
    answer = {"text": "Imagine the wildest idea that you've ever had, and you're curious about how it might scale...",
              "usage": {"type": "tokens", "input_tokens": 14, "input_token_details": {"text_tokens": 0,
                                                                                     "audio_tokens": 14},
                        "output_tokens": 45, "total_tokens": 59}}
    ex = exchange(make_exchange, "/v1/audio/transcriptions", model="gpt-4o-transcribe",
                  form={"model": "gpt-4o-transcribe"}, answer=answer, shape=oa.Transcription)
    assert charge(ex) == Charge("tokens", 59, pytest.approx((14 * 6.00 + 45 * 10.00) / 1e6), True)
    answer["usage"]["input_token_details"] = {"text_tokens": 20, "audio_tokens": 14}    # with a prompt
    answer["usage"]["input_tokens"] = 34
    ex.response_body = orjson.dumps(answer)
    assert charge(ex).usd == pytest.approx((20 * 2.50 + 14 * 6.00 + 45 * 10.00) / 1e6)
    del answer["usage"]["input_token_details"]                          # no breakdown: the input is audio
    ex.response_body = orjson.dumps(answer)
    assert charge(ex).usd == pytest.approx((34 * 6.00 + 45 * 10.00) / 1e6)
    ex.model = "gpt-4o-mini-transcribe"
    assert charge(ex).usd == pytest.approx((34 * 3.00 + 45 * 5.00) / 1e6)


@pytest.mark.parametrize("model,per_minute", [("whisper-1", 0.006), ("gpt-4o-transcribe", 0.006),
                                              ("gpt-4o-mini-transcribe", 0.003)])
def test_a_text_answer_is_charged_an_estimate_from_the_upload_size(make_exchange, model, per_minute):
    # response_format text/srt/vtt: the answer is plain text, not kept; the duration is unknown to the gateway.
    size = 90 * AUDIO_BYTES_PER_SECOND                                  # 90 s at the assumed 128 kbit/s
    ex = exchange(make_exchange, "/v1/audio/transcriptions", model=model,
                  form={"model": model, "response_format": "srt"}, headers={"content-length": str(size)})
    assert media.estimate(ex, T) == pytest.approx(1.5 * per_minute)    # admission: from the content-length
    ex.bytes_in = size
    assert charge(ex) == Charge("seconds", 90.0, pytest.approx(1.5 * per_minute), False)


def test_a_translation_json_answer_has_no_measure_either(make_exchange):
    ex = exchange(make_exchange, "/v1/audio/translations", model="whisper-1", form={"model": "whisper-1"},
                  answer={"text": "Hello, my name is Wolfgang and I come from Germany."}, bytes_in=480_000,
                  shape=oa.Translation)
    assert charge(ex) == Charge("seconds", 30.0, pytest.approx(0.003), False)


# -- moderations and embeddings -----------------------------------------------------------------------------------

def _every_category(value) -> dict:
    return {f.alias or name: value for name, f in ot.moderation.Categories.model_fields.items()}


MODERATION_ANSWER = {"id": "modr-0d9740456c391e43c445bf0f010940c7", "model": "omni-moderation-latest",
                     "results": [{"flagged": False, "categories": _every_category(False),
                                  "category_scores": _every_category(0.0001),
                                  "category_applied_input_types": _every_category(["text"])}]}


@pytest.mark.parametrize("inp,texts", [
    ("I want to kill them.", ["I want to kill them."]),
    (["first text", "a second, longer text to moderate"], ["first text", "a second, longer text to moderate"]),
    ([{"type": "text", "text": "...text to classify goes here..."},
      {"type": "image_url", "image_url": {"url": "https://example.com/image.png"}}],
     ["...text to classify goes here..."]),                               # the image part has no token count
    ("", [""]),
])
def test_moderation_tokens_are_counted_and_free(make_exchange, inp, texts):
    ex = exchange(make_exchange, "/v1/moderations", model="omni-moderation-latest",
                  body={"model": "omni-moderation-latest", "input": inp}, answer=MODERATION_ANSWER,
                  shape=ot.ModerationCreateResponse)
    n = sum(count_text(t, "o200k_base") for t in texts)
    assert charge(ex) == Charge("tokens", n, 0.0, True)
    assert (ex.prompt_tokens, ex.completion_tokens) == (n, 0)          # for the token rate limits
    assert media.estimate(ex, T) is None                               # admission: the budget's token estimate


def test_moderation_model_encoding_and_a_priced_moderation(make_exchange):
    text = "Ünïcödé and emoji 🎉 are tokenized differently by the two encodings 東京"
    assert count_text(text, "o200k_base") != count_text(text, "cl100k_base")
    ex = exchange(make_exchange, "/v1/moderations", model="text-moderation-latest",
                  body={"model": "text-moderation-latest", "input": text}, answer=MODERATION_ANSWER)
    assert charge(ex).quantity == count_text(text, "cl100k_base")
    ex = exchange(make_exchange, "/v1/moderations", body={"input": text}, answer=MODERATION_ANSWER)   # no model
    assert charge(ex).quantity == count_text(text, "o200k_base")       # the default, omni-moderation-latest
    priced = PriceTable({"my-mod": (2.0, 0.0)})
    ex = exchange(make_exchange, "/v1/moderations", model="my-mod", body={"input": text}, answer=MODERATION_ANSWER)
    c = charge(ex, priced)
    assert c.usd == pytest.approx(c.quantity * 2.0 / 1e6) and c.usd > 0


def test_embeddings_priced_from_usage_or_counted(make_exchange):
    answer = {"object": "list", "data": [{"object": "embedding", "embedding": [0.0023, -0.0093], "index": 0}],
              "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    ot.CreateEmbeddingResponse.model_validate(answer)
    ex = exchange(make_exchange, "/v1/embeddings", model="text-embedding-3-small",
                  body={"model": "text-embedding-3-small", "input": "The food was delicious and the waiter..."},
                  answer=answer)
    ex.prompt_tokens, ex.completion_tokens = 8, -1                     # what the gateway read from usage
    assert charge(ex) == Charge("tokens", 8, pytest.approx(8 * 0.02 / 1e6), True)
    ex.prompt_tokens = -1                                              # an upstream that sent no usage
    c = charge(ex)
    assert c.quantity == count_text("The food was delicious and the waiter...", "cl100k_base") == ex.prompt_tokens
    ex = exchange(make_exchange, "/v1/embeddings", model="text-embedding-3-small",
                  body={"input": [[1, 2, 3], [4, 5]]}, answer=answer)   # token arrays: their lengths
    assert charge(ex).quantity == 5
    ex = exchange(make_exchange, "/v1/embeddings", model="text-embedding-3-small", body={"input": [7, 8, 9]},
                  answer=answer)
    assert charge(ex).quantity == 3


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b'{"model":"m"}', b'{"input":5}', b'{"input":[1.5]}',
                                  b'{"input":["a",{"x":1},3]}', b'{"input":[null]}', b'{"input":{"a":1}}'])
def test_uncountable_inputs_leave_the_tokens_unknown(make_exchange, body):
    ex = make_exchange(path="/v1/moderations", model="omni-moderation-latest")
    ex.body, ex.status = body, 200
    assert not fill_counted_usage(ex) and ex.prompt_tokens == -1
    assert charge(ex) is None                       # the budget then charges its estimate


def test_count_input_only_fills_what_is_unknown_and_answered(make_exchange):
    body = orjson.dumps({"input": "hello world"})
    ex = make_exchange(path="/v1/moderations")
    ex.body, ex.status = body, 500
    assert not fill_counted_usage(ex)                # failed: nothing was used
    ex.status, ex.prompt_tokens = 200, 7
    assert not fill_counted_usage(ex) and ex.prompt_tokens == 7      # known already
    ex = make_exchange(path="/v1/chat/completions")
    ex.body, ex.status = body, 200
    assert not fill_counted_usage(ex) and ex.prompt_tokens == -1     # not an endpoint counted here
    assert count_input(body, "omni-moderation-latest") == 2


# -- every endpoint: failures, other endpoints, hostile answers --------------------------------------------------

@pytest.mark.parametrize("path,unit", [("/v1/images/generations", "images"), ("/v1/images/edits", "images"),
                                       ("/v1/audio/speech", "characters"), ("/v1/audio/transcriptions", "seconds"),
                                       ("/v1/audio/translations", "seconds"), ("/v1/moderations", "tokens"),
                                       ("/v1/embeddings", "tokens")])
@pytest.mark.parametrize("status", [400, 429, 499, 500, 502])
def test_an_answer_that_is_not_2xx_costs_nothing(make_exchange, path, unit, status):
    ex = exchange(make_exchange, path, model="dall-e-3", body={"model": "dall-e-3", "input": "x" * 100, "n": 4},
                  bytes_in=10**6, status=status)
    ex.response_body = b'{"error":{"message":"bad","type":"invalid_request_error","code":null}}'
    assert charge(ex) == Charge(unit, 0, 0.0, True)


def test_other_endpoints_are_not_priced_here(make_exchange):
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/files", "/v1/batches"):
        ex = exchange(make_exchange, path, model="gpt-4o", body={"model": "gpt-4o"}, answer={"usage": {}})
        assert charge(ex) is None and media.estimate(ex, T) is None


def test_hostile_answers_and_requests_never_crash_nor_go_negative(make_exchange):
    # Fields of the wrong type, negative, huge, NaN-like, missing, nested wrongly: a charge is a finite,
    # non-negative figure, never an exception.
    rng = random.Random(15)
    junk = [None, True, False, -1, -1e308, 0, 1, 2.5, 10**20, 1e308, "", "12", "auto", "hd", "1024x1024", [], [1],
            {}, {"x": 1}, "NaN"]

    def pick_dict(keys):
        return {k: rng.choice(junk) for k in keys if rng.random() < 0.7}

    paths = list(media.MEDIA_ENDPOINTS)
    models = ["dall-e-2", "dall-e-3", "gpt-image-1", "tts-1", "gpt-4o-mini-tts", "whisper-1", "gpt-4o-transcribe",
              "omni-moderation-latest", "text-embedding-3-small", "nope", ""]
    for _ in range(3000):
        req = pick_dict(["model", "n", "size", "quality", "input", "instructions", "response_format"])
        usage = pick_dict(["type", "seconds", "input_tokens", "output_tokens", "input_tokens_details",
                           "input_token_details"])
        if rng.random() < 0.5 and isinstance(usage.get("input_tokens_details"), dict):
            usage["input_tokens_details"] = pick_dict(["text_tokens", "image_tokens"])
        ans = pick_dict(["data", "size", "quality", "duration", "text"])
        if rng.random() < 0.7:
            ans["usage"] = usage if rng.random() < 0.8 else rng.choice(junk)
        ex = new_exchange(rng.choice(paths), rng.choice(models),
                          headers=rng.choice([{}, {"content-length": "10"}, {"content-length": "2000000"}]))
        ex.status = 200
        if rng.random() < 0.3:
            ex.form = {k: str(v) for k, v in req.items()}
        else:
            ex.body = json.dumps(req).encode()
        ans = json.dumps(ans).encode()       # json: orjson cannot write 10**20 (and reads it as a float)
        ex.response_body = rng.choice([ans, ans, b"[]", b"{", b"", None, b'"x"', b'{"usage":{"input_tokens":1e999}}'])
        est = media.estimate(ex, T)
        assert est is None or (math.isfinite(est) and est >= 0)
        c = charge(ex)
        assert c is None or (math.isfinite(c.usd) and c.usd >= 0 and c.quantity >= 0), (req, ans)


# -- the budget policy charging them --------------------------------------------------------------------------------

def budget(ctx, usd=1.0, **kw):
    return Budget(Config(budgets=[BudgetRule(usd=usd, consumer="*", period="day")], id="media", **kw), ctx)


def run(b, ex):
    """Admission, then (if admitted) the answer's accounting, as the gateway runs them."""
    b.request(ex)
    b.complete(ex)
    return ex.cost


def test_budget_reserves_and_charges_images(policy_ctx, make_exchange):
    b = budget(policy_ctx, usd=0.25)
    body = {"model": "dall-e-3", "prompt": "p", "size": "1792x1024", "quality": "hd"}
    ex = exchange(make_exchange, "/v1/images/generations", model="dall-e-3", body=body,
                  answer={"created": 1, "data": [{"url": "u"}]})
    ex.consumer = "alice"
    b.request(ex)
    assert b.spent("alice") == pytest.approx(0.12)               # reserved: one hd wide image
    ex.status = 200
    b.complete(ex)
    assert ex.cost == pytest.approx(0.12) and b.spent("alice") == pytest.approx(0.12)
    ex2 = exchange(make_exchange, "/v1/images/generations", model="dall-e-3", body=body, status=400)
    ex2.consumer = "alice"
    assert run(b, ex2) == 0.0                                     # refused upstream: the reservation comes back
    assert b.spent("alice") == pytest.approx(0.12)
    third = exchange(make_exchange, "/v1/images/generations", model="dall-e-3", body=body)
    third.consumer = "alice"
    b.request(third)                                              # 0.24 reserved of 0.25
    with pytest.raises(GatewayError) as e:                        # a fourth does not fit
        fourth = exchange(make_exchange, "/v1/images/generations", model="dall-e-3", body=body)
        fourth.consumer = "alice"
        b.request(fourth)
    assert e.value.status == 429 and e.value.code == "insufficient_quota"
    with pytest.raises(GatewayError) as e:                        # ten images are more than the whole budget
        many = exchange(make_exchange, "/v1/images/generations", model="dall-e-3", body={**body, "n": 10})
        many.consumer = "bob"
        b.request(many)
    assert "estimated cost alone ($1.2000)" in e.value.message


def test_budget_charges_speech_and_transcriptions(policy_ctx, make_exchange):
    b = budget(policy_ctx)
    ex = exchange(make_exchange, "/v1/audio/speech", model="tts-1-hd", body={"model": "tts-1-hd", "input": "a" * 4000,
                                                                            "voice": "alloy"})
    ex.consumer = "alice"
    assert run(b, ex) == pytest.approx(4000 * 30 / 1e6)
    ex = exchange(make_exchange, "/v1/audio/transcriptions", model="whisper-1", form={"model": "whisper-1"},
                  answer={"text": "hi", "usage": {"type": "duration", "seconds": 600}}, bytes_in=100_000)
    ex.consumer = "alice"
    assert run(b, ex) == pytest.approx(0.06)                      # ten minutes, whatever the upload's size
    assert b.spent("alice") == pytest.approx(0.12 + 0.06)
    assert policy_ctx.stats.snapshot()["counters"]["estimated_costs"] == []


def test_budget_counts_the_estimated_charges(policy_ctx, make_exchange):
    b = budget(policy_ctx)
    size = 120 * AUDIO_BYTES_PER_SECOND
    for model in ("whisper-1", "whisper-1", "mine"):
        ex = exchange(make_exchange, "/v1/audio/transcriptions", model=model,
                      form={"model": model, "response_format": "text"}, headers={"content-length": str(size)},
                      bytes_in=size)
        ex.consumer = "alice"
        assert run(b, ex) == pytest.approx(0.012 if model == "whisper-1" else 0.0)
    # Counted per model label (an unknown model is "other" and, unpriced, cost nothing: not counted).
    assert policy_ctx.stats.snapshot()["counters"]["estimated_costs"] == [
        [["whisper-1", "/v1/audio/transcriptions"], 2]]
    assert ('fastgw_estimated_costs_total{model="whisper-1",endpoint="/v1/audio/transcriptions"} 2\n'
            in policy_ctx.stats.render().decode())
    assert b.spent("alice") == pytest.approx(0.024)


def test_budget_moderations_are_free_but_their_tokens_reach_the_rate_limit(policy_ctx, make_exchange):
    rl = RateLimit(RLConfig(rules=[Rule(tokens=10_000, window="day")], id="t"), policy_ctx)
    b = budget(policy_ctx, usd=0.0)          # a budget of nothing: free requests still pass
    text = "Is this text harmful? " * 100
    ex = exchange(make_exchange, "/v1/moderations", model="omni-moderation-latest",
                  body={"model": "omni-moderation-latest", "input": text}, answer=MODERATION_ANSWER)
    ex.consumer = "alice"
    rl.request(ex)
    b.request(ex)
    rl.complete(ex)                          # rate-limit runs first (priority 300): it counts the tokens
    b.complete(ex)
    n = count_text(text, "o200k_base")
    assert ex.prompt_tokens == n and ex.cost == 0.0
    key = rl.rules[0].bucket_keys(ex)[1]
    assert rl.limiter.arena.peek(key, 10_000, 10_000 / 86400) == pytest.approx(10_000 - n, abs=1)


def test_budget_prices_from_the_policy_config(policy_ctx, make_exchange):
    b = budget(policy_ctx, prices={
        "dall-e-3": Price(per_image={"hd/1024x1024": 1.0, "standard/1024x1024": 0.5}, default_quality="standard"),
        "gpt-image-1": Price(per_image={"low/1024x1024": 2.0}),        # media only: its token prices stay
        "my-tts": Price(per_million_characters=100.0),
        "my-whisper": Price(per_minute=1.0),
        "my-img": Price(input=1.0, output=2.0, media_input=3.0)})
    assert b.prices.lookup("gpt-image-1") == (5.0, 40.0) and b.prices.media("gpt-image-1").per_image == {
        "low/1024x1024": 2.0}

    def cost(path, model, body=None, form=None, answer=None, bytes_in=0):
        ex = exchange(make_exchange, path, model=model, body=body, form=form, answer=answer, bytes_in=bytes_in)
        return run(b, ex)

    assert cost("/v1/images/generations", "dall-e-3", {"prompt": "p"}, answer={"data": [{}]}) == 0.5
    assert cost("/v1/images/generations", "dall-e-3", {"prompt": "p", "quality": "hd"}, answer={"data": [{}]}) == 1.0
    assert cost("/v1/images/generations", "gpt-image-1", {"prompt": "p"}, answer={"data": [{}, {}]}) == 4.0
    assert cost("/v1/audio/speech", "my-tts", {"input": "x" * 1000}) == pytest.approx(0.1)
    assert cost("/v1/audio/transcriptions", "my-whisper", form={},
                answer={"text": "", "usage": {"type": "duration", "seconds": 30}}) == pytest.approx(0.5)
    usage = {"input_tokens": 30, "output_tokens": 100, "input_tokens_details": {"text_tokens": 10, "image_tokens": 20}}
    assert cost("/v1/images/edits", "my-img", form={}, answer={"data": [{}], "usage": usage}) == pytest.approx(
        (10 * 1.0 + 20 * 3.0 + 100 * 2.0) / 1e6)


@pytest.mark.parametrize("price,problem", [
    (Price(), "give a price"),
    (Price(per_image={"big": 1.0}), "expected \"WxH\""),
    (Price(per_image={"hd/1024x": 1.0}), "expected \"WxH\""),
    (Price(per_image={"hd/1024x1024": -1.0}), "must be >= 0"),
    (Price(per_minute=-0.1), "must be >= 0"),
    (Price(input=-1.0), "must be >= 0"),
])
def test_bad_price_entries_are_refused_at_load(policy_ctx, price, problem):
    with pytest.raises(FieldError) as e:
        budget(policy_ctx, prices={"m": price})
    assert e.value.field.startswith("prices.m") and problem in e.value.problem


def test_chat_pricing_is_unchanged(policy_ctx, make_exchange):
    b = budget(policy_ctx, prices={"m": Price(input=1.0)})        # output left out: 0, as before
    assert b.prices.lookup("m") == (1.0, 0.0)
    ex = make_exchange(model="gpt-4o", consumer="alice", prompt=1000, max_tokens=1000)
    b.request(ex)
    assert b.spent("alice") == pytest.approx((1000 * 2.5 + 1000 * 10) / 1e6)
    ex.status, ex.prompt_tokens, ex.completion_tokens = 200, 1000, 10
    b.complete(ex)
    assert ex.cost == pytest.approx((1000 * 2.5 + 10 * 10) / 1e6)


def test_a_per_image_model_stays_per_image_even_with_usage(make_exchange):
    answer = {"created": 1, "data": [{"url": "u"}], "usage": {"input_tokens": 10, "output_tokens": 4000,
                                                              "total_tokens": 4010}}
    ex = exchange(make_exchange, "/v1/images/generations", model="dall-e-3", body={"prompt": "p"}, answer=answer)
    assert charge(ex) == Charge("images", 1, pytest.approx(0.04), True)
    ex = exchange(make_exchange, "/v1/audio/transcriptions", model="whisper-1", form={},
                  answer={"text": "", "usage": {"type": "tokens", "input_tokens": 5, "output_tokens": 5}},
                  bytes_in=AUDIO_BYTES_PER_SECOND * 60)
    assert charge(ex) == Charge("seconds", 60.0, pytest.approx(0.006), False)   # tokens it has no price for


def test_the_wildcard_route_names_no_model(make_exchange):
    # A request naming no model on a "*" route: the API's default model of the endpoint is what gets priced.
    ex = exchange(make_exchange, "/v1/images/generations", model="*", body={"prompt": "p"},
                  answer={"created": 1, "data": [{"url": "u"}]})
    assert media.estimate(ex, T) == pytest.approx(0.020) and charge(ex).usd == pytest.approx(0.020)   # dall-e-2
    ex = exchange(make_exchange, "/v1/moderations", model="*", body={"input": "hello there"},
                  answer=MODERATION_ANSWER)
    with_default = PriceTable(default=(50.0, 50.0))
    assert charge(ex, with_default) == Charge("tokens", count_text("hello there", "o200k_base"), 0.0, True)
