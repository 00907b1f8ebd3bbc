"""When a request stops: max_new_tokens, EOS (unless ignored), or a stop sequence."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class FinishReason(IntEnum):
    """Values equal the wire enum `generate.v3.FinishReason`."""

    LENGTH = 0
    EOS_TOKEN = 1
    STOP_SEQUENCE = 2


@dataclass(slots=True)
class StoppingCriteria:
    max_new_tokens: int
    stop_sequences: list[str]
    eos_token_ids: frozenset[int]
    ignore_eos: bool = False
    text: str = ""  # generated text so far, as emitted piece by piece
    num_generated: int = field(default=0)

    def step(self, token_id: int, new_text: str) -> FinishReason | None:
        """Records one generated token and its text; returns why to stop, if it should."""
        self.num_generated += 1
        if not self.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if new_text and self.stop_sequences:
            # A stop sequence can straddle tokens: search only the tail it could end in.
            longest = max(len(s) for s in self.stop_sequences)
            self.text += new_text
            tail = self.text[-(longest + len(new_text)) :]
            if any(stop in tail for stop in self.stop_sequences):
                return FinishReason.STOP_SEQUENCE
        if self.num_generated >= self.max_new_tokens:
            return FinishReason.LENGTH
        return None
