"""The attention interface: model code calls it and never knows which backend runs.

A forward mixes requests in two states: prefilling (several new tokens, maybe after a
cached prefix) and decoding (one new token). `AttentionInputs` describes the batch with
plain tensors built once per forward; each backend turns it into its own metadata once
(every backend's metadata carries `slot_mapping`), then `store_kv` and `attend` run per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from shard.kv_cache import NO_SCALES, KVScales, is_fp8, to_fp8


@dataclass(slots=True)
class AttentionInputs:
    """One forward's layout. T = new tokens in the forward, B = requests in it.

    Tokens of request i occupy rows `query_starts[i] : query_starts[i] + query_lens[i]`.
    """

    query_starts: list[int]  # [B]
    query_lens: list[int]  # [B] new tokens per request
    cache_lens: list[int]  # [B] tokens already in the cache before this forward
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with block 0
    block_size: int

    @property
    def context_lens(self) -> list[int]:
        """[B] tokens each request attends to: cached prefix + new tokens."""
        return [c + q for c, q in zip(self.cache_lens, self.query_lens, strict=True)]


class AttentionMetadata(Protocol):
    """What every backend's per-forward metadata carries (the rest is the backend's own)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token; -1 writes nothing


M = TypeVar("M", bound=AttentionMetadata)


class AttentionBackend(ABC, Generic[M]):
    """Computes causal attention over the paged cache for every new token of a batch; `M`
    is the backend's metadata type, built once per forward by `prepare`."""

    name: str = "abstract"
    # Whether decode steps can replay as CUDA graphs: the backend then implements
    # `decode_metadata(...)` over fixed-size tensors (no host work per step).
    supports_cuda_graphs: bool = False

    def __init__(self, name: str | None = None) -> None:
        if name is not None:  # one class may serve under several registry names
            self.name = name

    def prefill_report(self, dtype: torch.dtype, device: torch.device) -> str | None:
        """What attends plain prefill rows in `dtype` on `device`, for the shard's start-up
        log; None: the backend's own single path."""
        return None

    @abstractmethod
    def prepare(self, inputs: AttentionInputs) -> M:
        """Builds backend metadata once per forward (gather indices, masks, ...)."""

    def decode_metadata(
        self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
    ) -> M:
        """Metadata of an all-decode batch over static tensors (slot_mapping [B], block
        tables [B, max_blocks] int32, context_lens [B] int32): backends with
        `supports_cuda_graphs` implement it."""
        raise NotImplementedError(f"the {self.name} backend cannot decode in CUDA graphs")

    def store_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: M,
        scales: KVScales = NO_SCALES,
    ) -> None:
        """Writes new K/V [T, kv_heads, D] into their slots (`metadata.slot_mapping` [T]);
        an fp8 cache gets them divided by `scales` (shard/kv_cache.py)."""
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        slots = metadata.slot_mapping
        for cache, new, scale in ((k_cache, k, scales.k), (v_cache, v, scales.v)):
            rows = cache.view(-1, num_kv_heads, head_dim)
            if is_fp8(cache):  # PyTorch has no float8 index_copy_ on CPU: copy the bytes
                rows, new = rows.view(torch.uint8), to_fp8(new, scale).view(torch.uint8)
            rows.index_copy_(0, slots, new)

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: M,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
        scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        """q [T, heads, D], new k/v [T, kv_heads, D] (already stored) -> [T, heads, D].

        Caches hold q's dtype, or fp8 values read back as value * `scales` in float32.

        `window` > 0 (a sliding-window layer): the query at position p sees the keys at
        positions p - window + 1 .. p only, as transformers' sliding-window mask.
        `softcap` > 0 (Gemma 2): each scaled score s becomes softcap * tanh(s / softcap)."""
