"""Seeded, reproducible workloads (BENCHMARKING.md): each a list of (prompt, max_new_tokens).

Prompts are built from words that are single tokens for the model's tokenizer, so a prompt
of N words is N tokens; EOS is ignored by the load generator so every system does the same
work. `fixed`: 128 prompt and 128 new tokens; `varied`: prompts uniform in 16..512 tokens,
new tokens uniform in 16..256; `shared_prefix`: one ~1,000-token system prompt with short
distinct questions, 64 new tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

_CANDIDATES = (
    "the sea sky tree stone river light house city road field music paper water fire earth wind "
    "green blue red black white small large quick slow early late north south east west time "
    "year day night week month world life work home school story book game food money power"
).split()


@dataclass(frozen=True, slots=True)
class Request:
    prompt: str
    max_new_tokens: int
    prompt_tokens: int


def single_token_words(tokenizer_dir: str | Path | None) -> list[str]:
    """Words that encode to exactly one token (with their leading space)."""
    if tokenizer_dir is None:
        return list(_CANDIDATES)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return [
        w for w in _CANDIDATES if len(tokenizer.encode(" " + w, add_special_tokens=False).ids) == 1
    ]


def _text(rng: random.Random, words: list[str], count: int) -> str:
    return "".join(" " + rng.choice(words) for _ in range(count))


def fixed(
    n: int, seed: int = 0, words: list[str] | None = None, prompt: int = 128, new: int = 128
) -> list[Request]:
    rng, words = random.Random(seed), words or list(_CANDIDATES)
    return [Request(_text(rng, words, prompt), new, prompt) for _ in range(n)]


def varied(n: int, seed: int = 0, words: list[str] | None = None) -> list[Request]:
    rng, words = random.Random(seed), words or list(_CANDIDATES)
    out = []
    for _ in range(n):
        length = rng.randint(16, 512)
        out.append(Request(_text(rng, words, length), rng.randint(16, 256), length))
    return out


def shared_prefix(
    n: int, seed: int = 0, words: list[str] | None = None, prefix: int = 1000, new: int = 64
) -> list[Request]:
    rng, words = random.Random(seed), words or list(_CANDIDATES)
    system = _text(random.Random(12345), words, prefix)
    out = []
    for _ in range(n):
        question = rng.randint(8, 32)
        out.append(Request(system + _text(rng, words, question), new, prefix + question))
    return out


WORKLOADS = {"fixed": fixed, "varied": varied, "shared-prefix": shared_prefix}
