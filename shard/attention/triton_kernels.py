"""Triton kernels over the paged KV cache: writing new K/V into slots, and decode attention.

Cache layout (kv_cache.py): per layer `[num_blocks, block_size, kv_heads, D]`, contiguous,
so slot `s` (= block * block_size + offset) of KV head `h` starts at element
`(s * kv_heads + h) * D`. Both kernels run on CUDA, and on CPU tensors under
`TRITON_INTERPRET=1` (that is how CI checks them against the reference backend).

An fp8 cache (float8 e4m3fn, shard/kv_cache.py) is passed to the kernels as its bytes
(uint8) with FP8 set: they encode and decode e4m3 with integer operations, which every GPU
generation compiles (Triton's own fp8 type needs sm_89 or newer), bit-equal to PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shard.kv_cache import NO_SCALES, KVScales, inverse, is_fp8

TOKENS_PER_ITERATION = 64  # keys scored per loop iteration of the decode kernel
# Split-context decode (flash-decoding): with few (request, KV head) programs and long
# contexts, each context is cut into splits scored in parallel, then merged by log-sum-exp.
TARGET_PROGRAMS = 264  # two per streaming multiprocessor of an H100 (132)
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more to merge than it saves
MAX_SPLITS = 32


@triton.jit
def fp8_encode(x):
    """float32 x -> float8 e4m3fn bits (uint8): saturated to +-448, rounded to nearest even,
    as PyTorch's conversion."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)  # FP8_MAX (a jit function reads no globals)
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # normal (a >= 2^-6): float32's mantissa rounded to 3 bits (a carry bumps the exponent),
    # the exponent rebased from 127 to 7
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal: a multiple of 2^-9; adding 2^23 rounds a * 2^9 to an integer, nearest even
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return (sign | tl.where(a < 0.015625, sub, normal)).to(tl.uint8)


@triton.jit
def fp8_decode(b):
    """float8 e4m3fn bits (uint8) -> float32 (writers saturate, so no NaN is stored)."""
    x = b.to(tl.int32)
    e = (x >> 3) & 15
    m = x & 7
    sign = (x & 0x80) << 24
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
    return tl.where(e == 0, tl.where(sign != 0, -sub, sub), normal)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k,
    stride_v,
    inv_k,  # FP8: 1 / k_scale (float32), multiplied before encoding
    inv_v,
    ROW: tl.constexpr,  # kv_heads * D elements per token
    ROW_PAD: tl.constexpr,  # next power of two >= ROW
    FP8: tl.constexpr,  # caches are e4m3fn bytes
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # slot -1: a padding row (CUDA-graph batches) writes nothing
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        if FP8:
            k = fp8_encode(k.to(tl.float32) * inv_k)
            v = fp8_encode(v.to(tl.float32) * inv_v)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def as_kernel_cache(cache: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads: an fp8 cache's bytes, any other cache as it is."""
    return cache.view(torch.uint8) if is_fp8(cache) else cache


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: KVScales = NO_SCALES,
) -> None:
    """k, v [T, kv_heads, D] (each token's heads contiguous) -> their slots [T] (-1: skip);
    an fp8 cache stores them divided by `scales`."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    for t in (k, v):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, "K/V heads must be contiguous"
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        as_kernel_cache(k_cache),
        as_kernel_cache(v_cache),
        slot_mapping,
        k.stride(0),
        v.stride(0),
        inverse(scales.k),
        inverse(scales.v),
        **write_kv_constants(num_kv_heads, head_dim, is_fp8(k_cache)),
    )


def write_kv_constants(num_kv_heads: int, head_dim: int, fp8: bool = False) -> dict:
    """The write kernel's compile-time constants (tests compile it for CUDA with these)."""
    row = num_kv_heads * head_dim
    return {"ROW": row, "ROW_PAD": triton.next_power_of_2(row), "FP8": fp8}


@triton.jit
def _kv_offsets(table_ptr, pos, valid, kv_head, d, KV_HEADS, HEAD_DIM, BLOCK_SIZE):
    """Element offsets [TOKENS, DIM_PAD] of KV head `kv_head` at context positions `pos`
    [TOKENS] of the request whose block-table row starts at `table_ptr`, and their mask."""
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
    slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    offsets = (slot * KV_HEADS + kv_head)[:, None] * HEAD_DIM + d[None, :]
    return offsets, valid[:, None] & (d < HEAD_DIM)[None, :]


@triton.jit
def _load_cache(ptr, offs, mask, FP8: tl.constexpr):
    """Cache values at `offs` as float32 (an fp8 cache's stored values, before its scale)."""
    if FP8:
        return fp8_decode(tl.load(ptr + offs, mask=mask, other=0))
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _attend_keys(
    q, k_cache_ptr, v_cache_ptr, kv_offs, kv_mask, visible, scale, softcap, m_i, l_i, acc,
    PRECISION: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """One online-softmax step: q [R, DIM_PAD] (float32) against the keys at `kv_offs`;
    `visible` [R or 1, TOKENS] masks scores; `softcap` > 0 caps them (softcap * tanh(s /
    softcap)). Returns the updated running max m [R], sum l [R] and output acc [R, DIM_PAD].
    A row with nothing visible so far keeps m = -inf, l = 0. FP8: `scale` includes k_scale
    and acc is in units of v_scale (the caller multiplies it out)."""
    k = _load_cache(k_cache_ptr, kv_offs, kv_mask, FP8)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [R, TOKENS]
    if softcap > 0:
        scores = softcap * (2 * tl.sigmoid(2 * scores / softcap) - 1)  # tanh, from sigmoid
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a finite stand-in to subtract
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = _load_cache(v_cache_ptr, kv_offs, kv_mask, FP8)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)  # [R, DIM_PAD]
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    context_ptr,
    out_ptr,  # [B, heads, D]; or with SPLIT, float32 partial outputs [B, heads, splits, D]
    lse_ptr,  # with SPLIT: float32 [B, heads, splits] log-sum-exp of each split's scores
    scale,
    stride_q_row,
    stride_q_head,
    stride_out_row,
    stride_out_head,
    stride_table,
    split_len,  # keys per split, a multiple of TOKENS (the whole context without SPLIT)
    window,  # > 0: only the last `window` keys of each context are seen
    softcap,  # > 0: scores soft-capped
    v_scale,  # FP8: V's scale, multiplied into the output (1.0 otherwise)
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 and a power of two (tl.dot's smallest tile)
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    TOKENS: tl.constexpr,  # keys per iteration
    PRECISION: tl.constexpr,  # tl.dot's input precision: "ieee" for float32 q, else "tf32"
    FP8: tl.constexpr,  # caches are e4m3fn bytes (`scale` includes k_scale)
    SPLIT: tl.constexpr,  # write per-split partial results for _merge_splits_kernel
):
    """One program per (request, KV head, split): its GROUP query heads against the split's
    keys, context[split * split_len : (split + 1) * split_len] (empty past the context, and
    before a sliding window's first key).

    Online softmax in TOKENS-key steps; each key is found through the block table, so K/V
    are read in place (no gather into a contiguous copy)."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_ptr + row)
    first = tl.where(window > 0, tl.maximum(context - window, 0), 0)  # first key seen
    begin = tl.maximum(split * split_len, first)
    end = tl.minimum(context, split * split_len + split_len)
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
    for start in range(begin, end, TOKENS):
        pos = start + t
        valid = pos < end
        kv_offs, kv_mask = _kv_offsets(
            table_ptr + row * stride_table, pos, valid, kv_head, d, KV_HEADS, HEAD_DIM, BLOCK_SIZE
        )
        m_i, l_i, acc = _attend_keys(
            q, k_cache_ptr, v_cache_ptr, kv_offs, kv_mask, valid[None, :], scale, softcap, m_i,
            l_i, acc, PRECISION, FP8,
        )  # fmt: skip
    acc = acc * v_scale
    if SPLIT:
        # An empty split (past the context) has l = 0: output 0, log-sum-exp -inf (weight 0).
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        num_splits = tl.num_programs(2)
        part = (row * KV_HEADS * GROUP + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(lse_ptr + part, lse, mask=g < GROUP)
        tl.store(out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=q_mask)
    else:
        out = acc / l_i[:, None]
        out_offs = row * stride_out_row + heads[:, None] * stride_out_head + d[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,  # float32 [B, heads, splits, D]
    lse_ptr,  # float32 [B, heads, splits]
    out_ptr,
    stride_out_row,
    stride_out_head,
    num_splits,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # a power of two >= num_splits
):
    """One program per (request, head): softmax-weighted sum of its splits' outputs,
    weights exp(lse_s - max lse) (the split of the last key always holds keys, so the max
    is finite)."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    base = (row * HEADS + head) * num_splits
    lse = tl.load(lse_ptr + base + s, mask=s < num_splits, other=float("-inf"))
    weight = tl.exp(lse - tl.max(lse, 0))  # [SPLITS_PAD]
    mask = (s < num_splits)[:, None] & (d < HEAD_DIM)[None, :]
    parts = tl.load(partial_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)  # [DIM_PAD]
    offs = row * stride_out_row + head * stride_out_head + d
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_splits(num_rows: int, num_kv_heads: int, max_context: int) -> int:
    """Splits per context: enough programs to fill the GPU, none under MIN_SPLIT_TOKENS."""
    programs = num_rows * num_kv_heads
    if programs >= TARGET_PROGRAMS or max_context < 2 * MIN_SPLIT_TOKENS:
        return 1
    wanted = -(-TARGET_PROGRAMS // programs)
    return max(1, min(wanted, max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    splits: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
    scales: KVScales = NO_SCALES,
) -> torch.Tensor:
    """q [B, heads, D], caches [N, block_size, kv_heads, D], block_tables [B, max_blocks],
    context_lens [B] (each >= 1 and <= max_blocks * block_size) -> [B, heads, D]: one new
    token per request. `splits`: pieces each context is cut into (default: decode_splits,
    from the table width, so no device value is read and CUDA graphs can capture it).
    `window` > 0: each row sees only its last `window` keys; `softcap` > 0 caps scores;
    fp8 caches stand for their values times `scales`."""
    num_rows, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if num_rows == 0:
        return out
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.is_contiguous()
    max_context = block_tables.shape[1] * block_size
    if splits is None:
        splits = decode_splits(num_rows, num_kv_heads, max_context)
    tokens = TOKENS_PER_ITERATION
    split_len = -(-max_context // splits // tokens) * tokens if splits > 1 else max_context
    constants = decode_constants(num_heads, num_kv_heads, head_dim, block_size, q.dtype)
    fp8 = is_fp8(k_cache)
    if not fp8:
        scales = NO_SCALES
    partial, lse = out, out  # unused placeholders when not split
    if splits > 1:
        partial = torch.empty(num_rows, num_heads, splits, head_dim, device=q.device)
        lse = torch.empty(num_rows, num_heads, splits, device=q.device)
    _paged_decode_kernel[(num_rows, num_kv_heads, splits)](
        q,
        as_kernel_cache(k_cache),
        as_kernel_cache(v_cache),
        block_tables,
        context_lens,
        partial,
        lse,
        scale * scales.k,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        split_len,
        window,
        float(softcap),
        float(scales.v),
        FP8=fp8,
        SPLIT=splits > 1,
        **constants,
    )
    if splits > 1:
        _merge_splits_kernel[(num_rows, num_heads)](
            partial,
            lse,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            **merge_constants(num_heads, head_dim, splits),
        )
    return out


def decode_constants(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> dict:
    """The decode kernel's compile-time constants but FP8 (tests compile it for CUDA with
    these); `dtype`: the queries'."""
    group = num_heads // num_kv_heads
    return {
        "KV_HEADS": num_kv_heads,
        "GROUP": group,
        "GROUP_PAD": max(16, triton.next_power_of_2(group)),
        "HEAD_DIM": head_dim,
        "DIM_PAD": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_SIZE": block_size,
        "TOKENS": TOKENS_PER_ITERATION,
        # bf16/fp16 values are exact in tf32 (their products too, accumulated in float32), as
        # are fp8 caches'; float32 queries need full-precision products (tf32: 10 bits)
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def merge_constants(num_heads: int, head_dim: int, splits: int) -> dict:
    """The merge kernel's compile-time constants (tests compile it for CUDA with these)."""
    return {
        "HEADS": num_heads,
        "HEAD_DIM": head_dim,
        "DIM_PAD": max(16, triton.next_power_of_2(head_dim)),
        "SPLITS_PAD": max(2, triton.next_power_of_2(splits)),
    }


PREFILL_TOKENS = 16  # new tokens per prefill program (its rows: these x the KV head's group)


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    program_ptr,  # int32 [P, 4]: first q row, tokens (<= TOKENS_Q), first position, table row
    out_ptr,
    scale,
    stride_q_row,
    stride_q_head,
    stride_out_row,
    stride_out_head,
    stride_table,
    window,  # > 0: a token at position p sees keys p - window + 1 .. p only
    softcap,  # > 0: scores soft-capped
    v_scale,  # FP8: V's scale, multiplied into the output (1.0 otherwise)
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,  # next power of two >= GROUP
    TOKENS_Q: tl.constexpr,  # query tokens per program (PREFILL_TOKENS)
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,  # keys per iteration
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,  # caches are e4m3fn bytes (`scale` includes k_scale)
):
    """One program per (block of up to TOKENS_Q new tokens of one request, KV head).

    Rows are (token, query head of this KV head) pairs. Keys are every cached or new position
    up to the block's last token, read through the block table (this forward's K/V are
    already in the cache); token t at position p sees keys at positions <= p (causal)."""
    prog = tl.program_id(0)
    kv_head = tl.program_id(1)
    row0 = tl.load(program_ptr + prog * 4)
    count = tl.load(program_ptr + prog * 4 + 1)
    pos0 = tl.load(program_ptr + prog * 4 + 2)
    table_row = tl.load(program_ptr + prog * 4 + 3)
    r = tl.arange(0, TOKENS_Q * GROUP_P2)
    token = r // GROUP_P2
    head = kv_head * GROUP + r % GROUP_P2
    row_ok = (token < count) & (r % GROUP_P2 < GROUP)
    d = tl.arange(0, DIM_PAD)
    q_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q_offs = (row0 + token)[:, None] * stride_q_row + head[:, None] * stride_q_head + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(tl.float32)  # [R, DIM_PAD]
    query_pos = pos0 + token  # [R]
    m_i = tl.full([TOKENS_Q * GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([TOKENS_Q * GROUP_P2], tl.float32)
    acc = tl.zeros([TOKENS_Q * GROUP_P2, DIM_PAD], tl.float32)
    t = tl.arange(0, TOKENS)
    lowest = tl.where(window > 0, tl.maximum(pos0 - window + 1, 0), 0)  # the first token's
    for start in range(lowest, pos0 + count, TOKENS):
        pos = start + t
        valid = pos < pos0 + count
        kv_offs, kv_mask = _kv_offsets(
            table_ptr + table_row * stride_table, pos, valid, kv_head, d, KV_HEADS, HEAD_DIM,
            BLOCK_SIZE,
        )  # fmt: skip
        visible = valid[None, :] & (pos[None, :] <= query_pos[:, None])  # causal
        if window > 0:
            visible = visible & (pos[None, :] > query_pos[:, None] - window)
        m_i, l_i, acc = _attend_keys(
            q, k_cache_ptr, v_cache_ptr, kv_offs, kv_mask, visible, scale, softcap, m_i, l_i, acc,
            PRECISION, FP8,
        )  # fmt: skip
    out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_offs = (
        (row0 + token)[:, None] * stride_out_row + head[:, None] * stride_out_head + d[None, :]
    )
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_programs(
    query_starts: list[int],
    query_lens: list[int],
    cache_lens: list[int],
    requests: list[int],
    tokens_per_program: int,
) -> list[list[int]]:
    """[first q row, tokens, first position, table row] per program, for `requests`
    (indices into the batch): each request's new tokens in blocks of tokens_per_program."""
    programs = []
    for i in requests:
        for offset in range(0, query_lens[i], tokens_per_program):
            count = min(tokens_per_program, query_lens[i] - offset)
            programs.append([query_starts[i] + offset, count, cache_lens[i] + offset, i])
    return programs


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    programs: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    window: int = 0,
    softcap: float = 0.0,
    scales: KVScales = NO_SCALES,
) -> None:
    """Causal attention of prefill rows over the paged cache, written into `out`; `window`
    > 0 limits each token to its last `window` keys; `softcap` > 0 caps scores; fp8 caches
    stand for their values times `scales`.

    q, out [T, heads, D]; caches [N, block_size, kv_heads, D] already holding this forward's
    K/V; block_tables [B, max_blocks]; programs int32 [P, 4] from prefill_programs."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if programs.shape[0] == 0:
        return
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.is_contiguous()
    group = num_heads // num_kv_heads
    constants = decode_constants(num_heads, num_kv_heads, head_dim, block_size, q.dtype)
    fp8 = is_fp8(k_cache)
    if not fp8:
        scales = NO_SCALES
    _paged_prefill_kernel[(programs.shape[0], num_kv_heads)](
        q,
        as_kernel_cache(k_cache),
        as_kernel_cache(v_cache),
        block_tables,
        programs,
        out,
        scale * scales.k,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        window,
        float(softcap),
        float(scales.v),
        FP8=fp8,
        **prefill_constants(constants, group),
    )


def prefill_constants(decode: dict, group: int) -> dict:
    """The prefill kernel's compile-time constants, from the decode kernel's."""
    return {
        "KV_HEADS": decode["KV_HEADS"],
        "GROUP": group,
        "GROUP_P2": triton.next_power_of_2(group),
        "TOKENS_Q": PREFILL_TOKENS,
        "HEAD_DIM": decode["HEAD_DIM"],
        "DIM_PAD": decode["DIM_PAD"],
        "BLOCK_SIZE": decode["BLOCK_SIZE"],
        "TOKENS": decode["TOKENS"],
        "PRECISION": decode["PRECISION"],
    }
