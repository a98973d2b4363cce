"""What a request to a non-chat OpenAI endpoint costs: its units (images, characters, seconds, tokens) and their
price from the price table (prices.py). The budget policy calls `estimate` at admission (the reservation) and
`units_and_cost` in `complete` (the charge, which becomes ex.cost and the access log's cost_usd).

The rules, per endpoint (an answer that is not 2xx costs nothing, as OpenAI bills it):

  /v1/images/generations, /edits, /variations
      An answer with `usage` (the GPT Image models) is priced by its tokens: text input at the model's input
      price, image input (`input_tokens_details.image_tokens`) at its media_input price, output at its output
      price. Otherwise (DALL-E 2 and 3) per image: the answer's number of images (`len(data)`, else the request's
      `n`) x the price of the quality and size (the answer's `quality`/`size` when it has them, else the
      request's, else the model's defaults). A quality or size the table lacks, or "auto", takes the dearest
      matching entry: an upper bound. Admission reserves n x that per-image price.
  /v1/audio/speech
      Per character of the request's `input` (tts-1, tts-1-hd): exact, at admission too. A token-priced model
      (gpt-4o-mini-tts: text in, audio tokens out) answers with audio bytes and no usage, so its input
      (`input` + `instructions`) is counted exactly with tiktoken and its audio output estimated at
      SPEECH_AUDIO_TOKENS_PER_TEXT_TOKEN audio tokens per input token; the charge is marked estimated.
  /v1/audio/transcriptions, /translations
      `usage: {"type": "tokens", ...}` (gpt-4o-transcribe, gpt-4o-mini-transcribe): audio input tokens at the
      media_input price, text input (the prompt) at the input price, output at the output price.
      `usage: {"type": "duration", "seconds": N}` or verbose_json's `duration` (whisper-1): seconds x the price
      per minute / 60.
      An answer without either (response_format text, srt or vtt, answered as plain text): the gateway does not
      decode audio, so it cannot know the duration. It charges an estimate from the upload's size at
      AUDIO_BYTES_PER_SECOND (128 kbit/s, a common MP3/M4A speech rate) x the model's price per minute, counted
      in fastgw_estimated_costs_total. Why not nothing: a budget would then be bypassed by asking for text. Why
      not more exact: a compressed upload's duration depends on its codec and bitrate; a WAV upload is
      overcharged (2x at 16 kHz mono, more at higher rates), a low-bitrate Opus one undercharged. Clients that
      want exact charges ask for json or verbose_json (the SDKs' default is json). Admission reserves the same
      estimate from the request's content-length.
  /v1/moderations, /v1/embeddings
      By input tokens at the model's input price: the answer's usage (embeddings), else the tokens of the
      request's input counted exactly (fastgw/policies/usage.py; moderations never have usage). The moderation
      models cost 0; their tokens still go to ex.prompt_tokens for token rate limits. Admission: the token
      estimate of the budget policy (estimate returns None for them).

Request fields come from the JSON body, or for a multipart upload from ex.form (its text fields before the first
file); answers from ex.response_body (a 2xx JSON answer kept whole; None for audio bytes and text answers).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import orjson

from fastgw.policies.budget.prices import MediaPrice, PriceTable
from fastgw.policies.usage import fill_counted_usage

__all__ = ["Charge", "MEDIA_ENDPOINTS", "units_and_cost", "estimate", "AUDIO_BYTES_PER_SECOND",
           "SPEECH_AUDIO_TOKENS_PER_TEXT_TOKEN"]

# Upload bytes per second of audio assumed when a transcription's answer gives no duration: 128 kbit/s.
AUDIO_BYTES_PER_SECOND = 16_000
# gpt-4o-mini-tts audio output tokens per input text token, for its estimate: measured on OpenAI's billing at
# about 6 (S. Anand, "OpenAI TTS cost", 2025-11-02: 877 o200k tokens of text billed as ~5,300 audio tokens), which
# matches OpenAI's own estimate of $0.015 per minute of speech for it.
SPEECH_AUDIO_TOKENS_PER_TEXT_TOKEN = 6
MAX_IMAGES = 10                      # the API's largest n: a reservation for more would only refuse the request


class Charge(NamedTuple):
    unit: str          # what was counted: "images", "characters", "seconds" or "tokens"
    quantity: float    # how many
    usd: float         # what it costs
    measured: bool     # False: an estimate (the answer did not say what was used)


def _loads(data) -> Optional[dict]:
    if not data:
        return None
    try:
        v = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return v if isinstance(v, dict) else None


def _request(ex) -> dict:
    """The request's fields: a multipart upload's text fields (str values), else the JSON body's."""
    if ex.form is not None:
        return ex.form
    return _loads(ex.body) or {}


def _str(v) -> str:
    return v if isinstance(v, str) else ""


MAX_COUNT = 1e15     # more tokens or seconds than any request has: a broken answer, read as no figure


def _num(v) -> float:
    """A JSON count: a non-negative int or float (not a bool) up to MAX_COUNT, else -1."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT:
        return float(v)
    return -1.0


def _model(ex, req: dict, default: str) -> str:
    """The model as the gateway routed it (the client's name; for a request naming none, the route's), else the
    request's field, else the API's default for the endpoint ("*", the wildcard route, names no model)."""
    return (ex.model if ex.model != "*" else "") or _str(req.get("model")) or default


def _n(req: dict) -> int:
    """The request's n (JSON int or form string), between 1 and MAX_IMAGES; 1 when absent or not a number."""
    v = req.get("n")
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            return 1
    if isinstance(v, float) and v.is_integer():      # 2.0, or a large integer a JSON parser made a float
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        return 1
    return min(max(v, 1), MAX_IMAGES)


def _upload_bytes(ex) -> int:
    """The request body's size: what was read, else its content-length (at admission, before the body)."""
    n = ex.bytes_in
    h = ex.header(b"content-length")
    if h is not None:
        try:
            n = max(n, int(h))
        except ValueError:
            pass
    return max(n, 0)


def _token_cost(prices: PriceTable, mp: Optional[MediaPrice], model: str, text_in: float, media_in: float,
                out: float) -> float:
    tok = prices.lookup(model) or (0.0, 0.0)
    media = mp.media_input if mp is not None and mp.media_input is not None else tok[0]
    return (text_in * tok[0] + media_in * media + out * tok[1]) / 1e6


def _usage_split(usage: dict, media_key: str):
    """(text input, image or audio input, output) tokens of an images or transcription usage, or None.
    Without a breakdown the whole input is counted as `media_key` tokens (audio for a transcription, text
    for an image prompt)."""
    inp, out = _num(usage.get("input_tokens")), _num(usage.get("output_tokens"))
    if inp < 0:
        return None
    out = max(out, 0.0)
    # Images name it input_tokens_details, transcriptions input_token_details.
    det = usage.get("input_tokens_details") or usage.get("input_token_details")
    if isinstance(det, dict):
        text, media = _num(det.get("text_tokens")), _num(det.get(media_key))
        if text >= 0 or media >= 0:
            return max(text, 0.0), max(media, 0.0), out
    return (0.0, inp, out) if media_key == "audio_tokens" else (inp, 0.0, out)


def image_price(mp: MediaPrice, quality: str, size: str) -> float:
    """USD per image of the given quality and size ("" or "auto": the model's default, and when that is "" or
    "auto" too, the dearest entry that fits). A quality or size the table lacks: its dearest entry."""
    if not mp.per_image:
        return 0.0
    q = (quality or mp.default_quality).lower()
    s = (size or mp.default_size).lower()
    any_q, any_s = q in ("", "auto"), s in ("", "auto")
    best = -1.0
    for key, usd in mp.per_image.items():
        kq, _, ks = key.rpartition("/")
        if (any_q or not kq or kq == q) and (any_s or ks == s) and usd > best:
            best = usd
    return best if best >= 0 else max(mp.per_image.values())


# -- the endpoints --------------------------------------------------------------------------------------------

def _images(ex, prices: PriceTable, req: dict, ans: Optional[dict]) -> Charge:
    model = _model(ex, req, "dall-e-2")          # the API's default image model
    mp = prices.media(model)
    usage = ans.get("usage") if ans is not None else None
    # Usage tokens are the price of a token-priced model (GPT Image); a model priced per image stays so.
    split = _usage_split(usage, "image_tokens") if isinstance(usage, dict) and prices.lookup(model) else None
    if split is not None:
        return Charge("tokens", sum(split), _token_cost(prices, mp, model, *split), True)
    data = ans.get("data") if ans is not None else None
    measured = isinstance(data, list)
    count = len(data) if measured else _n(req)
    if mp is None:
        return Charge("images", count, 0.0, measured)
    quality = _str(ans.get("quality") if ans is not None else None) or _str(req.get("quality"))
    size = _str(ans.get("size") if ans is not None else None) or _str(req.get("size"))
    return Charge("images", count, count * image_price(mp, quality, size), measured)


def _speech(ex, prices: PriceTable, req: dict, ans: Optional[dict]) -> Charge:
    model = _model(ex, req, "tts-1")
    text = _str(req.get("input"))
    mp = prices.media(model)
    if mp is not None and mp.per_million_characters:
        return Charge("characters", len(text), len(text) * mp.per_million_characters / 1e6, True)
    tok = prices.lookup(model)
    if tok is None:
        return Charge("characters", len(text), 0.0, True)
    usage = ans.get("usage") if ans is not None else None   # a speech answer with usage (none today): exact
    if isinstance(usage, dict) and _num(usage.get("input_tokens")) >= 0:
        inp, out = _num(usage.get("input_tokens")), max(_num(usage.get("output_tokens")), 0.0)
        return Charge("tokens", inp + out, (inp * tok[0] + out * tok[1]) / 1e6, True)
    from fastgw.tokens.exact import count_text, encoding_for_model
    enc = encoding_for_model(model)
    inp = count_text(text, enc) + count_text(_str(req.get("instructions")), enc)
    out = inp * SPEECH_AUDIO_TOKENS_PER_TEXT_TOKEN
    return Charge("tokens", inp + out, (inp * tok[0] + out * tok[1]) / 1e6, False)


def _transcription(ex, prices: PriceTable, req: dict, ans: Optional[dict]) -> Charge:
    model = _model(ex, req, "whisper-1")
    mp = prices.media(model)
    usage = ans.get("usage") if ans is not None else None
    if isinstance(usage, dict):
        if usage.get("type") == "tokens" and prices.lookup(model) is not None:
            split = _usage_split(usage, "audio_tokens")
            if split is not None:
                return Charge("tokens", sum(split), _token_cost(prices, mp, model, *split), True)
        elif usage.get("type") == "duration" and _num(usage.get("seconds")) >= 0:
            return _per_minute(mp, _num(usage.get("seconds")), True)
    if ans is not None and _num(ans.get("duration")) >= 0:     # verbose_json
        return _per_minute(mp, _num(ans.get("duration")), True)
    return _per_minute(mp, _upload_bytes(ex) / AUDIO_BYTES_PER_SECOND, False)


def _per_minute(mp: Optional[MediaPrice], seconds: float, measured: bool) -> Charge:
    return Charge("seconds", seconds, seconds * (mp.per_minute if mp is not None else 0.0) / 60.0, measured)


def _tokens(ex, prices: PriceTable, req: dict, ans: Optional[dict]) -> Optional[Charge]:
    fill_counted_usage(ex)
    if ex.prompt_tokens < 0:
        return None                  # not countable: the budget policy charges its token estimate
    default = "omni-moderation-latest" if ex.endpoint == "/v1/moderations" else ""
    model = _model(ex, req, default)
    return Charge("tokens", ex.prompt_tokens, prices.cost(model, ex.prompt_tokens, ex.completion_tokens), True)


MEDIA_ENDPOINTS = {
    "/v1/images/generations": _images,
    "/v1/images/edits": _images,
    "/v1/images/variations": _images,
    "/v1/audio/speech": _speech,
    "/v1/audio/transcriptions": _transcription,
    "/v1/audio/translations": _transcription,
    "/v1/moderations": _tokens,
    "/v1/embeddings": _tokens,
}
_UNITS = {_images: "images", _speech: "characters", _transcription: "seconds", _tokens: "tokens"}


def units_and_cost(ex, prices: PriceTable) -> Optional[Charge]:
    """The charge of a finished exchange to one of MEDIA_ENDPOINTS; None for any other endpoint (priced by its
    token usage) and for a moderations or embeddings answer whose tokens are unknown."""
    rule = MEDIA_ENDPOINTS.get(ex.endpoint)
    if rule is None:
        return None
    if not 200 <= ex.status < 300:
        return Charge(_UNITS[rule], 0, 0.0, True)
    return rule(ex, prices, _request(ex), _loads(ex.response_body))


def estimate(ex, prices: PriceTable) -> Optional[float]:
    """USD to reserve at admission for a request to an images or audio endpoint; None for the others (the
    budget's token estimate applies)."""
    rule = MEDIA_ENDPOINTS.get(ex.endpoint)
    if rule is None or rule is _tokens:
        return None
    req = _request(ex)
    if rule is _images:
        mp = prices.media(_model(ex, req, "dall-e-2"))
        if mp is None:
            return 0.0
        return _n(req) * image_price(mp, _str(req.get("quality")), _str(req.get("size")))
    return rule(ex, prices, req, None).usd
