"""Model prices in US dollars per million tokens (input, output), for budgets and the cost metric.

The providers' published list prices for common models (OpenAI, Anthropic, Google Gemini; standard tier, no
cached-input discount, Gemini's prices for prompts up to 200k tokens); a policy file can override or add entries.
A model is priced by the virtual name the client asked for, whichever provider serves it. Dated snapshots ("gpt-4o-2024-08-06") find their family by the longest matching prefix.
"""
from __future__ import annotations

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
}


class PriceTable:
    """Prices by model with longest-prefix fallback; lookups are cached (bounded: model names are client input)."""

    def __init__(self, overrides: dict[str, tuple[float, float]] | None = None,
                 default: tuple[float, float] | None = None):
        self.prices = dict(DEFAULT_PRICES)
        if overrides:
            self.prices.update(overrides)
        self.default = default
        # Longest first, so "gpt-4o-mini-2024-07-18" finds "gpt-4o-mini" before "gpt-4o".
        self._prefixes = sorted(self.prices, key=len, reverse=True)
        self._cache: dict[str, tuple[float, float] | None] = {}

    def lookup(self, model: str) -> tuple[float, float] | None:
        """(input, output) USD per 1M tokens, or the default (None when there is none)."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = self.prices.get(model)
        if price is None:
            for p in self._prefixes:
                if model.startswith(p) and model[len(p):len(p) + 1] in ("-", ":", "@"):
                    price = self.prices[p]
                    break
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
