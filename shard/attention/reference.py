"""CPU reference backend built on PyTorch's scaled_dot_product_attention.

Decode rows are attended in one batched call: on CPU by the compiled paged-decode kernel
(shard/cpu_kernels.py, K/V read from the blocks in place), elsewhere or without a compiler over
K/V gathered from their block tables into SDPA. Prefill rows are attended one request at a
time (plain causal when nothing is cached, masked over the gathered prefix otherwise; with
AVX-512 by the compiled prefill kernel instead, float32 and, with bf16 dot products,
bfloat16). A
sliding window (`attend(..., window=w)`, per layer) narrows every mask to the last w keys;
soft-capped scores (`softcap`, Gemma 2) take PyTorch's plain ops instead of SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shard.attention.base import AttentionBackend, AttentionInputs
from shard.kv_cache import NO_SCALES, as_stored, is_fp8, readable


@dataclass(slots=True)
class PrefillRow:
    start: int  # first row of this request in q
    length: int  # new tokens
    context_blocks: torch.Tensor | None  # [nb] blocks of prefix + new tokens; None: no prefix
    mask: torch.Tensor | None  # [length, nb * block_size] bool, True where a key is visible
    cached: int = 0  # tokens before this forward's (the first query's position)
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> its mask

    def mask_for(self, window: int, device: torch.device) -> torch.Tensor | None:
        """The visibility mask [length, keys] with keys beyond `window` back hidden too
        (None: plain causal); keys are the gathered blocks', or the new tokens' alone."""
        if window <= 0 or window >= self.cached + self.length:
            return self.mask
        if window not in self.windowed:
            keys = self.length if self.mask is None else self.mask.shape[1]
            query_pos = torch.arange(self.cached, self.cached + self.length, device=device)
            key_pos = torch.arange(keys, device=device) + (
                0 if self.mask is not None else self.cached
            )
            seen = (key_pos[None, :] <= query_pos[:, None]) & (
                key_pos[None, :] > query_pos[:, None] - window
            )
            self.windowed[window] = seen
        return self.windowed[window]


@dataclass(slots=True)
class _Metadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    decode_rows: torch.Tensor | None  # [Bd] rows of q that decode; None: no decode rows
    decode_is_all: bool  # every row of q decodes, in order (no gather of q needed)
    decode_blocks: torch.Tensor | None  # [Bd * nb] block ids, row-major, padded with block 0
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, nb * block_size] bool, True where valid
    prefill_rows: list[PrefillRow]
    decode_tables: torch.Tensor | None = None  # [Bd, nb] block ids, for the CPU kernel
    decode_context: torch.Tensor | None = None  # [Bd] int64 context lengths
    decode_windowed: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> mask

    def decode_mask_for(self, window: int) -> torch.Tensor | None:
        """decode_mask with keys before each row's last `window` hidden too."""
        if window <= 0 or self.decode_mask is None or self.decode_context is None:
            return self.decode_mask
        if window not in self.decode_windowed:
            positions = torch.arange(self.decode_mask.shape[-1], device=self.decode_mask.device)
            recent = positions >= (self.decode_context - window).unsqueeze(1)
            self.decode_windowed[window] = self.decode_mask & recent[:, None, None, :]
        return self.decode_windowed[window]


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, num_rows: int) -> torch.Tensor:
    """cache [N, bs, KVH, D], blocks [num_rows * nb] -> [num_rows, nb * bs, KVH, D].

    Whole blocks are copied (index_select), several times faster than gathering slots.
    """
    gathered = cache.index_select(0, blocks)
    return gathered.view(num_rows, -1, cache.shape[2], cache.shape[3])


def prefill_row(inputs: AttentionInputs, i: int) -> PrefillRow:
    """Request i's rows, and for a cached prefix its blocks and visibility mask."""
    start, length, cached = inputs.query_starts[i], inputs.query_lens[i], inputs.cache_lens[i]
    if cached == 0:
        return PrefillRow(start, length, None, None)
    bs, device = inputs.block_size, inputs.block_tables.device
    num_blocks = -(-(cached + length) // bs)
    blocks = inputs.block_tables[i, :num_blocks]
    query_pos = torch.arange(cached, cached + length, device=device).unsqueeze(1)
    key_pos = torch.arange(num_blocks * bs, device=device).unsqueeze(0)
    mask = key_pos <= query_pos  # causal, hides padding
    return PrefillRow(start, length, blocks, mask, cached)


def attend_prefill_rows(
    q, k, v, k_cache, v_cache, rows: list[PrefillRow], scale, out, window=0, softcap=0.0,
    scales=NO_SCALES, kernel: bool = True,
) -> None:  # fmt: skip
    """Fills the `out` rows of each prefilling request, one SDPA call (or, with `kernel`,
    one call of the compiled prefill kernel where it applies) per request; keys and values as
    the cache holds them (fp8 ones times `scales`)."""
    group = q.shape[1] // k.shape[1]
    for row in rows:
        q_row = q[row.start : row.start + row.length]
        if row.context_blocks is None:
            k_row = as_stored(k[row.start : row.start + row.length], k_cache, scales.k)
            v_row = as_stored(v[row.start : row.start + row.length], v_cache, scales.v)
        else:
            k_row = readable(gather_blocks(k_cache, row.context_blocks, 1)[0], scales.k, q.dtype)
            v_row = readable(gather_blocks(v_cache, row.context_blocks, 1)[0], scales.v, q.dtype)
        mask = row.mask_for(window, q.device)
        if softcap > 0:
            if mask is None:  # plain causal over the new tokens
                mask = torch.ones(row.length, row.length, dtype=torch.bool, device=q.device).tril()
            q_t, k_t, v_t = (t.transpose(0, 1).unsqueeze(0) for t in (q_row, k_row, v_row))
            result = capped_attention(q_t, k_t, v_t, mask, scale, softcap)[0].transpose(0, 1)
        else:
            result = None
            if kernel and (window <= 0 or window >= row.cached + row.length):  # plain causal
                keys = row.cached + row.length  # the gathered blocks' padding dropped
                result = _kernel_prefill(q_row, k_row[:keys], v_row[:keys], scale)
            if result is None:
                result = _prefill(q_row, k_row, v_row, mask, scale, group)
        out[row.start : row.start + row.length] = result


def _prefill_module(dtype: torch.dtype, device: torch.device):
    """The compiled module if its prefill kernel takes `dtype` on `device`, else None: with
    AVX-512, float32 and bfloat16 (by bf16 dot products, or widened to float32 without them)."""
    if device.type != "cpu":
        return None
    from shard import cpu_kernels

    module = cpu_kernels.load()
    dtypes = getattr(module, "prefill_dtypes", ())
    return module if str(dtype).removeprefix("torch.") in dtypes else None


def _kernel_prefill(q, k, v, scale: float) -> torch.Tensor | None:
    """q [n, H, D] over its causal keys k, v [ctx, KVH, D] (a cached prefix, then the n
    new tokens) by the compiled kernel (`_prefill_module`), D a multiple of 32 up to 128
    (bfloat16: 3-6x SDPA's speed at 128-2048 tokens, benchmarks/RESULTS.md); None where it
    does not apply."""
    if not q.dtype == k.dtype == v.dtype:
        return None
    head_dim = q.shape[2]
    if head_dim % 32 or head_dim > 128 or q.stride(2) != 1 or q.stride(1) != head_dim:
        return None
    module = _prefill_module(q.dtype, q.device)
    return None if module is None else module.prefill_attention(q, k, v, scale)


def capped_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """q [B, H, n, D], k/v [B, KVH, ctx, D], mask broadcast to [B, H, n, ctx] (True: seen)
    -> [B, H, n, D]: scores soft-capped (softcap * tanh(s / softcap)) before the mask, as
    transformers' eager attention; softmax in float32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def _prefill(q, k, v, mask, scale: float, group: int) -> torch.Tensor:
    """q [n, H, D], k/v [ctx, KVH, D] -> [n, H, D]; causal, or `mask` over a cached prefix.

    Inputs go in as 4-D [1, heads, len, D] with enable_gqa: that is what selects
    PyTorch's fused CPU kernel (3-D inputs fall back to the quadratic math path)."""
    q_t = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    k_t = k.transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
    v_t = v.transpose(0, 1).unsqueeze(0)
    if mask is None:
        out = F.scaled_dot_product_attention(
            q_t, k_t, v_t, is_causal=True, scale=scale, enable_gqa=group > 1
        )
    else:
        out = F.scaled_dot_product_attention(
            q_t, k_t, v_t, attn_mask=mask, scale=scale, enable_gqa=group > 1
        )
    return out[0].transpose(0, 1)


class ReferenceBackend(AttentionBackend[_Metadata]):
    """Runs wherever PyTorch does; registered as "reference" (CPU default) and "sdpa"."""

    name = "reference"
    use_cpu_kernel = True  # tests and benchmarks turn it off to compare with gather + SDPA

    def uses_cpu_kernel(self, device: torch.device) -> bool:
        """Whether decode rows on `device` go through the C++ kernel (cpu_kernels.paged_decode)."""
        if not self.use_cpu_kernel or device.type != "cpu":
            return False
        from shard import cpu_kernels  # compiles once per machine

        return cpu_kernels.load() is not None

    def prefill_report(self, dtype: torch.dtype, device: torch.device) -> str:
        module = _prefill_module(dtype, device) if self.use_cpu_kernel else None
        if module is None:
            return "SDPA"
        tiles = dtype == torch.bfloat16 and module.amx_rows > 0 and module.amx_ready()
        return f"C++ kernel{' on AMX tiles' if tiles else ''} where plain causal, else SDPA"

    def store_kv(self, k_cache, v_cache, k, v, metadata: _Metadata, scales=NO_SCALES) -> None:
        """As the base class's; on CPU by one kernel call: into an fp8 cache (PyTorch's
        conversion and scatter take ~10 ops per layer), or rows copied into a cache of their
        dtype (`index_copy_` took ~30 us a call for 128 rows, 60 calls a SmolLM2 prefill)."""
        if self.uses_cpu_kernel(k_cache.device):
            from shard import cpu_kernels

            if is_fp8(k_cache):
                cpu_kernels.store_fp8(k_cache, v_cache, k, v, metadata.slot_mapping, scales)
                return
            if cpu_kernels.stores_rows(k_cache, k) and cpu_kernels.stores_rows(v_cache, v):
                cpu_kernels.store_kv(k_cache, v_cache, k, v, metadata.slot_mapping)
                return
        super().store_kv(k_cache, v_cache, k, v, metadata, scales)

    def prepare(self, inputs: AttentionInputs) -> _Metadata:
        decode_idx = [i for i, n in enumerate(inputs.query_lens) if n == 1]
        prefill_idx = [i for i, n in enumerate(inputs.query_lens) if n > 1]
        meta = _Metadata(inputs.slot_mapping, None, False, None, None, [])
        bs, device = inputs.block_size, inputs.block_tables.device
        if decode_idx:
            ctx = torch.tensor([inputs.context_lens[i] for i in decode_idx], device=device)
            num_blocks = -(-max(inputs.context_lens[i] for i in decode_idx) // bs)
            tables = inputs.block_tables[decode_idx, :num_blocks]
            meta.decode_context = ctx
            if self.uses_cpu_kernel(device):
                meta.decode_tables = tables
            else:
                meta.decode_blocks = tables.flatten()
                positions = torch.arange(num_blocks * bs, device=device)
                meta.decode_mask = (positions < ctx.unsqueeze(1))[:, None, None, :]
            rows = [inputs.query_starts[i] for i in decode_idx]
            meta.decode_is_all = not prefill_idx
            meta.decode_rows = torch.tensor(rows, device=device)
        meta.prefill_rows = [prefill_row(inputs, i) for i in prefill_idx]
        return meta

    def attend(
        self, q, k, v, k_cache, v_cache, metadata: _Metadata, scale, window=0, softcap=0.0,
        scales=NO_SCALES,
    ):  # fmt: skip
        out = torch.empty_like(q)
        if metadata.decode_rows is not None:
            rows = metadata.decode_rows
            q_dec = q if metadata.decode_is_all else q[rows]
            limits = (window, softcap, scales)
            out_dec = self._decode(q_dec, k_cache, v_cache, metadata, scale, *limits)
            if metadata.decode_is_all:
                return out_dec
            out[rows] = out_dec
        rows_p = metadata.prefill_rows
        attend_prefill_rows(
            q, k, v, k_cache, v_cache, rows_p, scale, out, window, softcap, scales,
            kernel=self.use_cpu_kernel,
        )  # fmt: skip
        return out

    @staticmethod
    def _decode(
        q, k_cache, v_cache, meta: _Metadata, scale: float, window: int, softcap: float, scales
    ) -> torch.Tensor:
        """q [Bd, H, D] -> [Bd, H, D]; the G query heads of a KV group act as G queries."""
        if meta.decode_tables is not None and meta.decode_context is not None:
            from shard import cpu_kernels

            return cpu_kernels.paged_decode(
                q, k_cache, v_cache, meta.decode_tables, meta.decode_context, scale, window,
                softcap, scales,
            )  # fmt: skip
        num_rows, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        q_grouped = q.view(num_rows, num_kv_heads, group, head_dim)
        assert meta.decode_blocks is not None
        keys = gather_blocks(k_cache, meta.decode_blocks, num_rows)  # [Bd, L, KVH, D]
        values = gather_blocks(v_cache, meta.decode_blocks, num_rows)
        keys = readable(keys, scales.k, q.dtype).transpose(1, 2)  # [Bd, KVH, L, D]
        values = readable(values, scales.v, q.dtype).transpose(1, 2)
        mask = meta.decode_mask_for(window)
        if softcap > 0:
            out = capped_attention(
                q.view(num_rows, num_heads, 1, head_dim), keys, values, mask, scale, softcap
            )
        else:
            out = F.scaled_dot_product_attention(
                q_grouped, keys, values, attn_mask=mask, scale=scale
            )
        return out.reshape(num_rows, num_heads, head_dim)
