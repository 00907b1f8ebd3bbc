"""Triton kernels over the paged KV cache: writing new K/V into slots, and decode attention.

Cache layout (kv_cache.py): per layer `[num_blocks, block_size, kv_heads, D]`, contiguous,
so slot `s` (= block * block_size + offset) of KV head `h` starts at element
`(s * kv_heads + h) * D`. Both kernels run on CUDA, and on CPU tensors under
`TRITON_INTERPRET=1` (that is how CI checks them against the reference backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_ITERATION = 64  # keys scored per loop iteration of the decode kernel


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k,
    stride_v,
    ROW: tl.constexpr,  # kv_heads * D elements per token
    ROW_PAD: tl.constexpr,  # next power of two >= ROW
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # slot -1: a padding row (CUDA-graph batches) writes nothing
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, kv_heads, D] (each token's heads contiguous) -> their slots [T] (-1: skip)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    for t in (k, v):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, "K/V heads must be contiguous"
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        **write_kv_constants(num_kv_heads, head_dim),
    )


def write_kv_constants(num_kv_heads: int, head_dim: int) -> dict:
    """The write kernel's compile-time constants (tests compile it for CUDA with these)."""
    row = num_kv_heads * head_dim
    return {"ROW": row, "ROW_PAD": triton.next_power_of_2(row)}


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    context_ptr,
    out_ptr,
    scale,
    stride_q_row,
    stride_q_head,
    stride_out_row,
    stride_out_head,
    stride_table,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 and a power of two (tl.dot's smallest tile)
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    TOKENS: tl.constexpr,  # keys per iteration
    PRECISION: tl.constexpr,  # tl.dot's input precision: "ieee" for float32 caches, else "tf32"
):
    """One program per (request, KV head): its GROUP query heads against its context.

    Online softmax over the context in TOKENS-key steps; each key is found through the
    block table, so K/V are read in place (no gather into a contiguous copy)."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_ptr + row)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    heads = kv_head * GROUP + g
    q_offs = row * stride_q_row + heads[:, None] * stride_q_head + d[None, :]
    # Scores and sums in float32 whatever the cache dtype (decode is bound by reading K/V).
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(tl.float32)  # [GROUP_PAD, DIM_PAD]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    t = tl.arange(0, TOKENS)
    for start in range(0, context, TOKENS):
        pos = start + t
        valid = pos < context
        block = tl.load(table_ptr + row * stride_table + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_offs = (slot * KV_HEADS + kv_head)[:, None] * HEAD_DIM + d[None, :]
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TOKENS]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)  # [GROUP_PAD, DIM_PAD]
        m_i = m_new
    out = acc / l_i[:, None]
    out_offs = row * stride_out_row + heads[:, None] * stride_out_head + d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, heads, D], caches [N, block_size, kv_heads, D], block_tables [B, max_blocks],
    context_lens [B] (each >= 1) -> [B, heads, D]: one new token per request."""
    num_rows, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if num_rows == 0:
        return out
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.is_contiguous()
    _paged_decode_kernel[(num_rows, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        **decode_constants(num_heads, num_kv_heads, head_dim, block_size, k_cache.dtype),
    )
    return out


def decode_constants(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> dict:
    """The decode kernel's compile-time constants (tests compile it for CUDA with these)."""
    group = num_heads // num_kv_heads
    return {
        "KV_HEADS": num_kv_heads,
        "GROUP": group,
        "GROUP_PAD": max(16, triton.next_power_of_2(group)),
        "HEAD_DIM": head_dim,
        "DIM_PAD": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_SIZE": block_size,
        "TOKENS": TOKENS_PER_ITERATION,
        # bf16/fp16 values are exact in tf32 (their products too, accumulated in float32);
        # float32 caches need full-precision products, which tf32 would round to 10 bits
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
