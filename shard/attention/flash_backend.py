"""flash-attn backend: the Triton backend (K/V writes, paged decode, CUDA graphs) composed
with a prefill path through `flash_attn_varlen_func`.

flash-attn 2 reads paged K/V only when a block holds a multiple of 256 tokens: with such
blocks the prefill passes the block tables and reads the cache in place; with smaller ones
(the default 16) a request's cached prefix is gathered into a contiguous copy first, as it
is from an fp8 cache (flash-attn 2 reads no fp8), multiplied out to q's dtype on the way.
Importing this module fails when flash-attn is not installed: the registry reports that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flash_attn import flash_attn_varlen_func

from shard.attention.base import AttentionInputs
from shard.attention.reference import gather_blocks
from shard.attention.triton_backend import TritonBackend
from shard.kv_cache import NO_SCALES, KVScales, as_stored, is_fp8, readable

PAGED_BLOCK_MULTIPLE = 256  # flash-attn 2's page size requirement


@dataclass(slots=True)
class _FlashPlan:
    q_index: torch.Tensor | None  # [Tp] rows of q that prefill; None: all rows, in order
    cu_q: torch.Tensor  # [P + 1] int32 offsets of each request's new tokens
    cu_k: torch.Tensor  # [P + 1] int32 offsets of each request's context
    max_q: int
    max_k: int
    block_table: torch.Tensor | None  # [P, max_blocks] int32 when reading the cache in place
    # per request: (first row in q, new tokens, context length, blocks or None: no prefix)
    sources: list[tuple[int, int, int, torch.Tensor | None]]


def flash_attn_backend(name: str | None = None) -> TritonBackend:
    """The registry's constructor: Triton's decode with flash-attn's prefill."""
    return TritonBackend(name or "flash-attn", prefill_path=FlashPrefill())


class FlashPrefill:
    """Prefill rows through flash-attn's variable-length kernel (a PrefillPath)."""

    def plan(self, inputs: AttentionInputs, idx: list[int], has_decode: bool) -> _FlashPlan:
        device, bs = inputs.block_tables.device, inputs.block_size
        new = [inputs.query_lens[i] for i in idx]
        context = [inputs.context_lens[i] for i in idx]
        sources = []
        for i, ctx in zip(idx, context, strict=True):
            blocks = None
            if inputs.cache_lens[i]:
                blocks = inputs.block_tables[i, : -(-ctx // bs)]
            sources.append((inputs.query_starts[i], inputs.query_lens[i], ctx, blocks))
        q_index = None
        if has_decode:
            rows = [r for start, n, _, _ in sources for r in range(start, start + n)]
            q_index = torch.tensor(rows, device=device)
        paged = bs % PAGED_BLOCK_MULTIPLE == 0
        table = inputs.block_tables[idx].to(torch.int32) if paged else None

        def offsets(lengths: list[int]) -> torch.Tensor:
            values = [0]
            for n in lengths:
                values.append(values[-1] + n)
            return torch.tensor(values, dtype=torch.int32, device=device)

        return _FlashPlan(
            q_index, offsets(new), offsets(context), max(new), max(context), table, sources
        )

    def attend(
        self, q, k, v, k_cache, v_cache, plan: _FlashPlan, scale, out, window=0, softcap=0.0,
        scales: KVScales = NO_SCALES,
    ) -> None:  # fmt: skip
        q_p = q if plan.q_index is None else q[plan.q_index]
        block_table = None if is_fp8(k_cache) else plan.block_table
        if block_table is not None:
            k_p, v_p = k_cache, v_cache  # [N, bs, KVH, D], read through the block table
        elif plan.q_index is None and all(s[3] is None for s in plan.sources):
            # plain prefill: the new K/V (as stored) are every request's whole context
            k_p, v_p = as_stored(k, k_cache, scales.k), as_stored(v, v_cache, scales.v)
        else:
            k_p = torch.cat([self._context(k, k_cache, s, scales.k) for s in plan.sources])
            v_p = torch.cat([self._context(v, v_cache, s, scales.v) for s in plan.sources])
        capped = {"softcap": softcap} if softcap > 0 else {}  # flash-attn >= 2.6
        result = flash_attn_varlen_func(
            q_p,
            k_p,
            v_p,
            plan.cu_q,
            plan.cu_k,
            plan.max_q,
            plan.max_k,
            softmax_scale=scale,
            causal=True,  # aligned bottom-right: new tokens see the whole cached prefix
            window_size=(window - 1, 0) if window > 0 else (-1, -1),  # keys left of a query
            block_table=block_table,
            **capped,
        )
        if plan.q_index is None:
            out.copy_(result)
        else:
            out[plan.q_index] = result

    @staticmethod
    def _context(new: torch.Tensor, cache: torch.Tensor, source, scale: float) -> torch.Tensor:
        """[ctx, KVH, D]: the request's new K (or V) rows, or its prefix + new from blocks
        (fp8 ones times `scale`)."""
        start, length, context, blocks = source
        if blocks is None:
            return as_stored(new[start : start + length], cache, scale)
        return readable(gather_blocks(cache, blocks, 1)[0, :context], scale, new.dtype)
