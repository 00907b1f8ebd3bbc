"""Incremental detokenization that never emits half a UTF-8 character.

The text of new tokens is decoded together with a few tokens before them (so spaces and
merges render as in a full decode); while the tail decodes to U+FFFD the tokens are held
back and their text comes out with the token that completes the character.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # tokens of context before the unread ones when starting


class IncrementalDetokenizer:
    """Per-request decode state over the request's full token list (prompt + output)."""

    __slots__ = ("prefix_offset", "read_offset")

    def __init__(self, prompt_len: int) -> None:
        self.prefix_offset = max(prompt_len - _CONTEXT_TOKENS, 0)
        self.read_offset = prompt_len

    def step(self, tokenizer: Tokenizer, all_ids: list[int]) -> str:
        """Text added by the tokens past `read_offset` ("" while a character is incomplete)."""
        prefix = tokenizer.decode(
            all_ids[self.prefix_offset : self.read_offset], skip_special_tokens=False
        )
        full = tokenizer.decode(all_ids[self.prefix_offset :], skip_special_tokens=False)
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            new_text = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(all_ids)
            return new_text
        return ""
