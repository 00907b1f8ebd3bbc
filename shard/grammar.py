"""Constrained generation in the shard: a request's grammar as a mask over the vocabulary.

Each request gets its own matcher from the shard's `GrammarCompiler` (compiled grammars are
cached by their text, common/grammar.py). Every tensor-parallel rank runs the same matcher on
the same tokens, so all ranks choose alike.

Invariants: a constrained row's logits are -inf wherever the grammar forbids the token; EOS
is allowed only where the grammar accepts; when the grammar is complete (accepting, nothing
may follow) the request ends.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from common.grammar import GrammarCache, GrammarSpec
from shard.errors import InvalidRequest


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self.vocab_size, self.eos_ids = vocab_size, eos_ids
        self._cache = GrammarCache(tokenizer, vocab_size, eos_ids)

    def compile(self, spec: GrammarSpec) -> Grammar:
        """A request's grammar at its start; InvalidRequest with the engine's reason."""
        try:
            return Grammar(self._cache.matcher(spec), self.vocab_size, self.eos_ids)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None


class Grammar:
    """One request's position in its grammar."""

    _BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)

    def __init__(self, matcher, vocab_size: int, eos_ids: list[int]) -> None:
        self._matcher, self._vocab_size, self._eos = matcher, vocab_size, eos_ids
        self._failed = False

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next (EOS only where it accepts)."""
        raw = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        bits = (raw.unsqueeze(-1) & self._BITS).ne(0).flatten()  # little-endian bit order
        allowed = torch.zeros(self._vocab_size, dtype=torch.bool)
        n = min(self._vocab_size, bits.numel())
        allowed[:n] = bits[:n]
        if not bool(allowed.any()):  # the matcher failed: end the request (at EOS if any)
            self._failed = True
            allowed[self._eos[:1] or slice(None)] = True
        return allowed

    def advance(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def is_complete(self) -> bool:
        """Accepting and nothing may follow (or the matcher failed): the request ends."""
        return self._failed or bool(self._matcher.is_stopped())
