"""Grammars that constrain a request's output (a JSON schema or a regex), checked and compiled
by llguidance. Torch-free: the router checks a request's grammar with it (422 with the
engine's reason), the shard compiles it for masking (shard/grammar.py).

The engine was chosen by measurement (benchmarks/grammar_engines.py, benchmarks/RESULTS.md):
it compiles a grammar in milliseconds and computes each step's mask lazily.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

# kinds (TGI's GrammarType JSON = 1, REGEX = 2 on the wire; LARK = 100 is pytgi's)
JSON, REGEX, LARK = "json", "regex", "lark"
CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: str  # JSON (a JSON schema, as JSON text), REGEX or LARK (llguidance's Lark)
    text: str


def json_schema_spec(schema: Any) -> GrammarSpec:
    """A JSON schema given as an object or as JSON text; ValueError when it is neither."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be an object")
    return GrammarSpec(JSON, json.dumps(schema))  # property order kept: it is the output order


def grammar_source(spec: GrammarSpec) -> str:
    """The llguidance grammar of a spec (not yet checked); ValueError for an unknown kind or
    a schema that is not a JSON object."""
    import llguidance

    if spec.kind == REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == LARK:
        return llguidance.LLMatcher.grammar_from_lark(spec.text)
    if spec.kind != JSON:
        raise ValueError(f"unknown grammar type {spec.kind!r}; use json or regex")
    schema = json_schema_spec(spec.text).text
    # compact output (no free whitespace): fewer tokens, and no endless runs of spaces
    return llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False}
    )


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte's stand-in character -> the byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Each token id's bytes (ids past the tokenizer's vocabulary: empty) and the ids the
    grammar must never allow (special and added tokens, padding). Byte-level vocabularies
    (GPT-2's alphabet) and SentencePiece ones ("▁" for a space, "<0x0A>" byte tokens) both;
    read from the vocabulary itself, whatever decoder chain the tokenizer file declares."""
    config = json.loads(tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(config.get("pre_tokenizer")) + json.dumps(
        config.get("decoder")
    )
    table = _byte_decoder()
    tokens, special = [b""] * vocab_size, set(range(vocab_size))
    for text, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
        if token_id >= vocab_size:
            continue
        if byte_level and all(c in table for c in text):
            tokens[token_id] = bytes(table[c] for c in text)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens[token_id] = bytes([int(text[3:5], 16)])
        else:
            tokens[token_id] = text.replace("\u2581", " ").encode()
        special.discard(token_id)
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        if token_id < vocab_size:
            tokens[token_id] = added.content.encode()
            if added.special:
                special.add(token_id)
            else:
                special.discard(token_id)
    return tokens, sorted(special)


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS, special ids, encode."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.tokens, self.special_token_ids = token_bytes(tokenizer, vocab_size)
        self.eos_token_id = eos_ids[0] if eos_ids else None
        self.bos_token_id = None

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


class GrammarCache:
    """Compiled grammars for one tokenizer, by spec; thread-safe. `matcher(spec)` gives a
    fresh matcher at the grammar's start, or ValueError with the engine's reason when the
    grammar cannot be compiled or allows no output at all."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None, eos_ids: list[int]) -> None:
        self._tokenizer, self._eos = tokenizer, eos_ids
        self._vocab_size = vocab_size or tokenizer.get_vocab_size(with_added_tokens=True)
        self._lltok: Any = None  # built on first use: ~0.4 s for a 49k vocabulary
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, spec: GrammarSpec) -> Any:
        with self._lock:
            template = self._cache.get(spec)
            if template is None:
                template = self._build(spec)
                self._cache[spec] = template
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec)
            return template.deep_copy()

    def _build(self, spec: GrammarSpec) -> Any:
        import llguidance

        if self._lltok is None:
            vocabulary = _Vocabulary(self._tokenizer, self._vocab_size, self._eos)
            self._lltok = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(vocabulary),
                n_vocab=self._vocab_size,
                eos_token=self._eos or None,
            )
        matcher = llguidance.LLMatcher(self._lltok, grammar_source(spec), log_level=0)
        mask = matcher.compute_bitmask()  # some errors (an empty language) show only here
        if matcher.is_error():
            reason = " ".join(matcher.get_error().split("<state>")[0].split())[:500]
            if reason == "NoExtensionBias":  # llguidance's word for an empty language
                reason = "no text matches it"
            raise ValueError(f"the grammar cannot be used: {reason}")
        size = self._vocab_size
        if not any(mask[i // 8] >> (i % 8) & 1 for i in range(size)):
            raise ValueError("the grammar cannot be used: it allows no output")
        return matcher
