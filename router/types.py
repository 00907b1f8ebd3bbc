"""Plain records the router passes around; the gRPC edge (client.py) converts them."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.grammar import GrammarSpec


@dataclass(frozen=True, slots=True)
class Params:
    """Validated generation parameters of one request."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: int = 0  # 0: off
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    add_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # the output's JSON schema or regex


@dataclass(slots=True)
class ShardRequest:
    """A request as the scheduler hands it to the shards."""

    id: int
    inputs: str
    params: Params
    blocks: list[int]
    block_size: int
    cache_len: int = 0
    chunk_len: int | None = None
    input_ids: list[int] = field(default_factory=list)  # tokenized and truncated; [] unknown

    @property
    def slots(self) -> list[int]:
        bs = self.block_size
        return [b * bs + i for b in self.blocks for i in range(bs)]


@dataclass(frozen=True, slots=True)
class TokenOut:
    id: int
    logprob: float
    text: str
    special: bool


@dataclass(frozen=True, slots=True)
class FinishedOut:
    text: str
    generated_tokens: int
    finish_reason: str  # "length" | "eos_token" | "stop_sequence", as TGI names them
    seed: int | None


@dataclass(slots=True)
class GenerationOut:
    request_id: int
    tokens: list[TokenOut]
    prefill: list[TokenOut] | None = None
    top_tokens: list[list[TokenOut]] = field(default_factory=list)
    finished: FinishedOut | None = None


@dataclass(frozen=True, slots=True)
class CachedBatch:
    id: int
    request_ids: tuple[int, ...]
    max_tokens: int
    current_tokens: int

    @property
    def size(self) -> int:
        return len(self.request_ids)


@dataclass(slots=True)
class StepOut:
    generations: list[GenerationOut]
    batch: CachedBatch | None
    forward_ns: int = 0
    decode_ns: int = 0
    total_ns: int = 0
    concat_ns: int | None = None  # shard time joining batches; None when none were joined
    # Prefill: new requests the shards refused (request id -> reason); the rest ran
    refused: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    dtype: str
    device_type: str
    block_size: int
    support_chunking: bool
    use_prefix_caching: bool
    attention_impl: str
    requires_padding: bool = False
    window_size: int | None = None
    speculate: int = 0
    # pytgi extensions (Info fields 100+), summed or listed over every rank
    device_name: str = "cpu"
    device_memory_used: int = 0  # bytes, all ranks
    device_memory_total: int = 0  # bytes, all ranks
    kv_cache_blocks: int = 0  # per rank (every rank holds the same blocks)
    kv_cache_bytes: int = 0  # bytes, all ranks
    cuda_graph_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WarmupOut:
    max_supported_total_tokens: int
    max_input_tokens: int
    max_total_tokens: int
