"""What the harnesses share: deterministic ways to cut an input into reads, and a small reader of the selector
bytes that some targets put in front of their payload."""
from __future__ import annotations

import random
import zlib

# Byte-by-byte feeding costs a parser call per byte: only for inputs this short.
BYTEWISE_MAX = 600


def pieces(data: bytes, most: int = 8) -> list[bytes]:
    """data cut at up to `most` points chosen from its own CRC: the same input always gives the same reads
    (a crash replays), and every input is also tried in pieces, not only whole."""
    rng = random.Random(zlib.crc32(data))
    cuts = sorted({rng.randrange(len(data) + 1) for _ in range(rng.randrange(most + 1))})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def select(data: bytes, choices: list):
    """(choices[data[0] % len], the rest of data): a leading byte picks what a multi-function target runs."""
    if not data:
        return choices[0], b""
    return choices[data[0] % len(choices)], data[1:]
