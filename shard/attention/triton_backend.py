"""Triton backend: K/V written by a Triton kernel, attention read from the blocks in place by
Triton kernels: paged decode (one new token per request, split over long contexts) and
paged prefill (blocks of new tokens, causal over any cached prefix). One launch each per
layer, whatever the mix of requests.

Decode metadata is plain device tensors (block tables, context lengths), so a decode
forward can also be captured in a CUDA graph (see shard/cuda_graphs.py).

The prefill rows go through a `PrefillPath` the backend is built with: Triton's paged
prefill kernel here; flash-attn's varlen kernel in the flash-attn backend, which is this
backend composed with that path (shard/attention/flash_backend.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from shard.attention.base import AttentionBackend, AttentionInputs
from shard.attention.triton_kernels import (
    PREFILL_TOKENS,
    paged_decode,
    paged_prefill,
    prefill_programs,
    write_kv,
)
from shard.kv_cache import NO_SCALES, KVScales


@dataclass(slots=True)
class TritonMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot per new token; -1 writes nothing
    decode_rows: torch.Tensor | None  # [Bd] rows of q that decode; None when all rows do
    block_tables: torch.Tensor | None  # [Bd, max_blocks] int32; None: no decode rows
    context_lens: torch.Tensor | None  # [Bd] int32, each >= 1
    prefill: Any = None  # the prefill path's plan for the prefill rows; None: none


@dataclass(slots=True)
class PrefillPlan:
    programs: torch.Tensor  # int32 [P, 4]: first q row, tokens, first position, table row
    block_tables: torch.Tensor  # int32 [B, max_blocks], the whole batch's


class PrefillPath(Protocol):
    """How the prefill rows of a forward are attended (their K/V already in the cache)."""

    def plan(self, inputs: AttentionInputs, idx: list[int], has_decode: bool) -> Any:
        """Host work for the prefilling requests `idx`, once per forward."""
        ...

    def attend(
        self, q, k, v, k_cache, v_cache, plan: Any, scale: float, out, window=0, softcap=0.0,
        scales: KVScales = NO_SCALES,
    ) -> None:  # fmt: skip
        """Writes the prefill rows of `out` [T, heads, D] (`window`, `softcap`, `scales`: as
        AttentionBackend's)."""
        ...


class TritonPrefill:
    """Triton's paged prefill kernel: blocks of new tokens, causal over any cached prefix."""

    def plan(self, inputs: AttentionInputs, idx: list[int], has_decode: bool) -> PrefillPlan:
        programs = prefill_programs(
            inputs.query_starts, inputs.query_lens, inputs.cache_lens, idx, PREFILL_TOKENS
        )
        device = inputs.block_tables.device
        return PrefillPlan(
            torch.tensor(programs, dtype=torch.int32, device=device).view(-1, 4),
            inputs.block_tables.to(torch.int32),
        )

    def attend(
        self, q, k, v, k_cache, v_cache, plan: PrefillPlan, scale, out, window=0, softcap=0.0,
        scales: KVScales = NO_SCALES,
    ) -> None:  # fmt: skip
        tables, programs = plan.block_tables, plan.programs
        paged_prefill(q, k_cache, v_cache, tables, programs, scale, out, window, softcap, scales)


class TritonBackend(AttentionBackend[TritonMetadata]):
    """Triton K/V writes and paged decode; prefill rows through `prefill_path`."""

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, name: str | None = None, prefill_path: PrefillPath | None = None) -> None:
        super().__init__(name)
        self.prefill_path = prefill_path or TritonPrefill()

    def prepare(self, inputs: AttentionInputs) -> TritonMetadata:
        device = inputs.block_tables.device
        decode_idx = [i for i, n in enumerate(inputs.query_lens) if n == 1]
        prefill_idx = [i for i, n in enumerate(inputs.query_lens) if n > 1]
        meta = TritonMetadata(inputs.slot_mapping, None, None, None)
        if decode_idx:
            context = [inputs.context_lens[i] for i in decode_idx]
            meta.block_tables = inputs.block_tables[decode_idx].to(torch.int32)
            meta.context_lens = torch.tensor(context, dtype=torch.int32, device=device)
            if prefill_idx:
                rows = [inputs.query_starts[i] for i in decode_idx]
                meta.decode_rows = torch.tensor(rows, device=device)
        if prefill_idx:
            meta.prefill = self.prefill_path.plan(inputs, prefill_idx, bool(decode_idx))
        return meta

    def decode_metadata(
        self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
    ) -> TritonMetadata:
        """Metadata of an all-decode batch over the given (static) tensors: no host work
        per forward, as CUDA-graph capture needs."""
        return TritonMetadata(slot_mapping, None, block_tables, context_lens)

    def store_kv(
        self, k_cache, v_cache, k, v, metadata: TritonMetadata, scales: KVScales = NO_SCALES
    ) -> None:
        write_kv(k_cache, v_cache, k, v, metadata.slot_mapping, scales)

    def attend(
        self, q, k, v, k_cache, v_cache, metadata: TritonMetadata, scale, window=0, softcap=0.0,
        scales: KVScales = NO_SCALES,
    ):  # fmt: skip
        tables, context = metadata.block_tables, metadata.context_lens
        limits = {"window": window, "softcap": softcap, "scales": scales}
        if tables is not None and context is not None and metadata.prefill is None:
            return paged_decode(q, k_cache, v_cache, tables, context, scale, **limits)
        out = torch.empty_like(q)
        if tables is not None and context is not None:
            rows = metadata.decode_rows
            out[rows] = paged_decode(q[rows], k_cache, v_cache, tables, context, scale, **limits)
        meta = metadata.prefill
        self.prefill_path.attend(
            q, k, v, k_cache, v_cache, meta, scale, out, window, softcap, scales
        )
        return out
