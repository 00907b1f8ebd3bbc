"""One record per request, and a batch as a list of them.

Invariant (vLLM's "computed tokens catch up with total tokens"): `all_ids` holds the prompt
and every generated token; the K/V of `all_ids[:num_computed]` are in the request's blocks.
A forward computes the next `query_len` tokens ("new tokens this step": one name, here and
in `AttentionInputs.query_lens`); when `num_computed` reaches `len(all_ids)` the request
emits a new token. Prefill, chunked prefill, a prefix-cache hit
and decode are the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.grammar import GrammarSpec
from shard.detokenize import IncrementalDetokenizer
from shard.sampling import SamplingParams, TokenChooser
from shard.stopping import FinishReason, StoppingCriteria


@dataclass(slots=True)
class RequestSpec:
    """A new request as it arrives, already free of wire types."""

    id: int
    inputs: str
    sampling: SamplingParams
    max_new_tokens: int
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    truncate: int = 0
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    blocks: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    cache_len: int = 0
    add_special_tokens: bool = True
    chunk_len: int | None = None
    input_ids: list[int] | None = None  # pre-tokenized prompt (warmup); skips `inputs`
    grammar: GrammarSpec | None = None  # output constrained to a JSON schema or a regex
    unsupported: str | None = None  # set at the wire edge: why this request is refused


@dataclass(slots=True)
class RequestState:
    id: int
    prompt_len: int
    all_ids: list[int]
    blocks: list[int]
    num_computed: int
    chunk_len: int | None
    chooser: TokenChooser
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    top_n_tokens: int
    prefill_logprobs: bool
    owns_blocks: bool  # blocks were numbered by the shard and return to its free list
    prompt_logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    long_rope: bool = False  # longrope models: computed with the long factors (shard/step.py)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.all_ids) - self.prompt_len

    @property
    def query_len(self) -> int:
        """New tokens the next forward computes for this request (0 once finished)."""
        if self.is_finished:
            return 0
        remaining = len(self.all_ids) - self.num_computed
        if self.is_prefilling and self.chunk_len:
            return min(self.chunk_len, remaining)
        return remaining


@dataclass(slots=True)
class Batch:
    id: int
    requests: list[RequestState]

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    def max_tokens(self, block_size: int) -> int:
        """KV tokens the batch holds: blocks x block size."""
        return sum(len(r.blocks) for r in self.requests) * block_size

    @property
    def current_tokens(self) -> int:
        return sum(r.query_len for r in self.requests)

    def keep(self, request_ids: set[int]) -> list[RequestState]:
        """Keeps only `request_ids`; returns the requests that left."""
        left = [r for r in self.requests if r.id not in request_ids]
        self.requests = [r for r in self.requests if r.id in request_ids]
        return left


@dataclass(slots=True)
class TokenInfo:
    """Token ids with log-probabilities, texts and special flags, aligned by index."""

    ids: list[int]
    logprobs: list[float]
    texts: list[str]
    is_special: list[bool]


@dataclass(slots=True)
class FinishedText:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None


@dataclass(slots=True)
class Generation:
    request_id: int
    tokens: TokenInfo
    prefill_tokens: TokenInfo | None = None
    top_tokens: list[TokenInfo] = field(default_factory=list)
    finished: FinishedText | None = None


@dataclass(slots=True)
class CachedBatchInfo:
    id: int
    request_ids: list[int]
    max_tokens: int
    current_tokens: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """A new request the shard did not admit, and why (one line about the request)."""

    request_id: int
    message: str


@dataclass(slots=True)
class StepResult:
    generations: list[Generation]
    batch: CachedBatchInfo | None  # None once every request has finished
    forward_ns: int
    decode_ns: int
    total_ns: int
    concat_ns: int | None = None
    refused: list[Refusal] = field(default_factory=list)  # Prefill only
