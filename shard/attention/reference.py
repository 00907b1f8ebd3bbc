"""CPU reference backend built on PyTorch's scaled_dot_product_attention.

Decode rows are attended in one batched call over K/V gathered from their block tables;
prefill rows are attended one request at a time (plain causal when nothing is cached,
masked over the gathered prefix otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard.attention.base import AttentionBackend, AttentionInputs


@dataclass(slots=True)
class _PrefillRow:
    start: int  # first row of this request in q
    length: int  # new tokens
    context_slots: torch.Tensor | None  # [ctx] slots of prefix + new tokens; None: no prefix
    mask: torch.Tensor | None  # [length, ctx] bool, True where a key is visible


@dataclass(slots=True)
class _Metadata:
    decode_rows: torch.Tensor | None  # [Bd] rows of q that decode; None: no decode rows
    decode_is_all: bool  # every row of q decodes, in order (no gather of q needed)
    decode_slots: torch.Tensor | None  # [Bd, L] context slots, padded with slot 0
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] bool, True where a key is valid
    prefill_rows: list[_PrefillRow]


def context_slots(block_tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """[B, length] slot of every position < length, from block tables [B, max_blocks]."""
    offsets = torch.arange(block_size, dtype=block_tables.dtype, device=block_tables.device)
    slots = (block_tables.unsqueeze(-1) * block_size + offsets).flatten(1)
    return slots[:, :length]


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def prepare(self, inputs: AttentionInputs) -> _Metadata:
        decode_idx = [i for i, n in enumerate(inputs.query_lens) if n == 1]
        prefill_idx = [i for i, n in enumerate(inputs.query_lens) if n > 1]
        meta = _Metadata(None, False, None, None, [])
        if decode_idx:
            ctx = torch.tensor([inputs.context_lens[i] for i in decode_idx])
            max_ctx = int(ctx.max())
            tables = inputs.block_tables[decode_idx]
            meta.decode_slots = context_slots(tables, inputs.block_size, max_ctx)
            meta.decode_mask = (torch.arange(max_ctx) < ctx.unsqueeze(1))[:, None, None, :]
            rows = [inputs.query_starts[i] for i in decode_idx]
            meta.decode_is_all = not prefill_idx
            meta.decode_rows = torch.tensor(rows)
        for i in prefill_idx:
            meta.prefill_rows.append(self._prefill_row(inputs, i))
        return meta

    @staticmethod
    def _prefill_row(inputs: AttentionInputs, i: int) -> _PrefillRow:
        start, length, cached = inputs.query_starts[i], inputs.query_lens[i], inputs.cache_lens[i]
        if cached == 0:
            return _PrefillRow(start, length, None, None)
        ctx = cached + length
        slots = context_slots(inputs.block_tables[i : i + 1], inputs.block_size, ctx)[0]
        query_pos = torch.arange(cached, ctx).unsqueeze(1)
        mask = torch.arange(ctx).unsqueeze(0) <= query_pos
        return _PrefillRow(start, length, slots, mask)

    def attend(self, q, k, v, k_cache, v_cache, metadata: _Metadata, scale: float):
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k.shape[1]
        out = torch.empty_like(q)
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        if metadata.decode_rows is not None:
            rows = metadata.decode_rows
            q_dec = q if metadata.decode_is_all else q[rows]
            out_dec = self._decode(q_dec, k_flat, v_flat, metadata, scale)
            if metadata.decode_is_all:
                return out_dec
            out[rows] = out_dec
        for row in metadata.prefill_rows:
            q_row = q[row.start : row.start + row.length]
            if row.context_slots is None:
                k_row = k[row.start : row.start + row.length]
                v_row = v[row.start : row.start + row.length]
            else:
                k_row, v_row = k_flat[row.context_slots], v_flat[row.context_slots]
            out[row.start : row.start + row.length] = self._prefill(
                q_row, k_row, v_row, row.mask, scale, num_heads // num_kv_heads
            )
        return out

    @staticmethod
    def _decode(q, k_flat, v_flat, meta: _Metadata, scale: float) -> torch.Tensor:
        """q [Bd, H, D] -> [Bd, H, D]; the G query heads of a KV group act as G queries."""
        num_rows, num_heads, head_dim = q.shape
        num_kv_heads = k_flat.shape[1]
        group = num_heads // num_kv_heads
        q_grouped = q.view(num_rows, num_kv_heads, group, head_dim)
        keys = k_flat[meta.decode_slots].transpose(1, 2)  # [Bd, KVH, L, D]
        values = v_flat[meta.decode_slots].transpose(1, 2)  # [Bd, KVH, L, D]
        out = F.scaled_dot_product_attention(
            q_grouped, keys, values, attn_mask=meta.decode_mask, scale=scale
        )
        return out.reshape(num_rows, num_heads, head_dim)

    @staticmethod
    def _prefill(q, k, v, mask, scale: float, group: int) -> torch.Tensor:
        """q [n, H, D], k/v [ctx, KVH, D] -> [n, H, D], causal (mask given when ctx > n)."""
        q_t = q.transpose(0, 1)  # [H, n, D]
        k_t = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, ctx, D]
        v_t = v.transpose(0, 1).repeat_interleave(group, dim=0)
        if mask is None:
            out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, scale=scale)
        return out.transpose(0, 1)
