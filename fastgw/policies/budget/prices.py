"""Model prices in US dollars, for budgets and the cost metric: per million tokens (input, output), and for the
models of the non-chat endpoints per image, per minute of audio or per million characters (MediaPrice).

The providers' published list prices for common models (OpenAI, Anthropic, Google Gemini; standard tier, no
cached-input discount, Gemini's prices for prompts up to 200k tokens); a policy file can override or add entries.
A model is priced by the virtual name the client asked for, whichever provider serves it. Dated snapshots ("gpt-4o-2024-08-06") find their family by the longest matching prefix.
How the media prices turn into a request's cost: fastgw/policies/budget/media.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# model -> (input USD per 1M tokens, output USD per 1M tokens)
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o1": (15.00, 60.00),
    "o1-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "claude-opus-4-1": (15.00, 75.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-haiku": (0.25, 1.25),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.0),
    # The token-priced models of the non-chat endpoints (OpenAI's pricing page, platform.openai.com/docs/pricing,
    # and the model pages on developers.openai.com/api/docs/models, as of 2025). Input is the text input price;
    # their image or audio input tokens are priced by DEFAULT_MEDIA's media_input below.
    "gpt-image-1": (5.00, 40.00),             # output: image output tokens
    "gpt-image-1-mini": (2.00, 8.00),
    "gpt-4o-transcribe": (2.50, 10.00),       # text prompt in, text out (audio in: media_input)
    "gpt-4o-mini-transcribe": (1.25, 5.00),
    "gpt-4o-mini-tts": (0.60, 12.00),         # text in, audio tokens out
    "omni-moderation": (0.0, 0.0),            # moderations are free; their tokens still count for rate limits
    "text-moderation": (0.0, 0.0),
}


@dataclass(frozen=True)
class MediaPrice:
    """What a model of the images or audio endpoints costs besides (or instead of) its tokens."""
    media_input: float | None = None     # USD per 1M image or audio input tokens (None: the text input price)
    # USD per image, by "quality/size" ("hd/1024x1792") or "size" ("256x256") when the model has one quality.
    per_image: dict[str, float] = field(default_factory=dict)
    default_quality: str = ""            # the API's default when the request names none; "auto" or "": any (the
    default_size: str = "1024x1024"      # dearest matching entry is used, an upper bound)
    per_minute: float = 0.0              # USD per minute of input audio (transcriptions, translations)
    per_million_characters: float = 0.0  # USD per 1M characters of speech input


# List prices per image, minute and character: OpenAI's pricing page (platform.openai.com/docs/pricing, "Image
# generation" and "Transcription and speech generation") and model pages (developers.openai.com/api/docs/models/
# gpt-image-1, gpt-image-1-mini, gpt-4o-transcribe), as of 2025. gpt-image-1's per-image figures are OpenAI's own
# per-image prices of its output tokens at each quality and size: used for admission estimates and for an answer
# without usage; an answer's usage is priced by tokens. The transcribe models' per-minute figures are OpenAI's
# published estimates, used only where the answer carries no usage (a text, srt or vtt answer; media.py). The
# gpt-4o-transcribe model page shows one audio price pair ($2.50 in, $10 out); the pricing page lists audio input
# at $6.00 (mini: $3.00) besides the text prices, which is what the $0.006 (mini: $0.003) per-minute estimate
# matches: that is the figure used here.
DEFAULT_MEDIA: dict[str, MediaPrice] = {
    "dall-e-2": MediaPrice(per_image={"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.020}),
    "dall-e-3": MediaPrice(default_quality="standard", per_image={
        "standard/1024x1024": 0.040, "standard/1024x1792": 0.080, "standard/1792x1024": 0.080,
        "hd/1024x1024": 0.080, "hd/1024x1792": 0.120, "hd/1792x1024": 0.120}),
    "gpt-image-1": MediaPrice(media_input=10.00, default_quality="auto", default_size="auto", per_image={
        "low/1024x1024": 0.011, "low/1024x1536": 0.016, "low/1536x1024": 0.016,
        "medium/1024x1024": 0.042, "medium/1024x1536": 0.063, "medium/1536x1024": 0.063,
        "high/1024x1024": 0.167, "high/1024x1536": 0.25, "high/1536x1024": 0.25}),
    "gpt-image-1-mini": MediaPrice(media_input=2.50, default_quality="auto", default_size="auto", per_image={
        "low/1024x1024": 0.005, "low/1024x1536": 0.006, "low/1536x1024": 0.006,
        "medium/1024x1024": 0.011, "medium/1024x1536": 0.015, "medium/1536x1024": 0.015,
        "high/1024x1024": 0.036, "high/1024x1536": 0.052, "high/1536x1024": 0.052}),
    "whisper-1": MediaPrice(per_minute=0.006),
    "gpt-4o-transcribe": MediaPrice(media_input=6.00, per_minute=0.006),
    "gpt-4o-mini-transcribe": MediaPrice(media_input=3.00, per_minute=0.003),
    "tts-1": MediaPrice(per_million_characters=15.00),
    "tts-1-hd": MediaPrice(per_million_characters=30.00),
}

# Names a metrics label may carry (fastgw.policies.loader.model_label): every model with a price.
KNOWN_MODELS = frozenset(DEFAULT_PRICES) | frozenset(DEFAULT_MEDIA)


def _longest_prefix(table: dict, prefixes: list, model: str):
    """table's entry for model, or for the longest name that model extends by "-", ":" or "@" (a snapshot)."""
    price = table.get(model)
    if price is None:
        for p in prefixes:
            if model.startswith(p) and model[len(p):len(p) + 1] in ("-", ":", "@"):
                return table[p]
    return price


class PriceTable:
    """Prices by model with longest-prefix fallback; lookups are cached (bounded: model names are client input)."""

    def __init__(self, overrides: dict[str, tuple[float, float]] | None = None,
                 default: tuple[float, float] | None = None, media: dict[str, MediaPrice] | None = None):
        """overrides: token prices replacing or adding to DEFAULT_PRICES; media: media prices replacing or adding
        to DEFAULT_MEDIA (each a model's whole media entry)."""
        self.prices = dict(DEFAULT_PRICES)
        if overrides:
            self.prices.update(overrides)
        self.default = default
        self.media_prices = dict(DEFAULT_MEDIA)
        if media:
            self.media_prices.update(media)
        # Longest first, so "gpt-4o-mini-2024-07-18" finds "gpt-4o-mini" before "gpt-4o".
        self._prefixes = sorted(self.prices, key=len, reverse=True)
        self._media_prefixes = sorted(self.media_prices, key=len, reverse=True)
        self._cache: dict[str, tuple[float, float] | None] = {}
        self._media_cache: dict[str, MediaPrice | None] = {}

    def lookup(self, model: str) -> tuple[float, float] | None:
        """(input, output) USD per 1M tokens, or the default (None when there is none)."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = _longest_prefix(self.prices, self._prefixes, model)
        if price is None:
            price = self.default
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[model] = price
        return price

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for a request; 0.0 for a model without a price."""
        price = self.lookup(model)
        if price is None:
            return 0.0
        return (max(prompt_tokens, 0) * price[0] + max(completion_tokens, 0) * price[1]) / 1e6

    def media(self, model: str) -> MediaPrice | None:
        """The model's per-image, per-minute or per-character prices (longest prefix, like lookup); None when it
        has none (there is no default media price: such a model is priced by its tokens, or costs 0)."""
        try:
            return self._media_cache[model]
        except KeyError:
            pass
        price = _longest_prefix(self.media_prices, self._media_prefixes, model)
        if len(self._media_cache) > 4096:
            self._media_cache.clear()
        self._media_cache[model] = price
        return price
