"""The compiled prefill attention (shard/csrc/prefill.cpp; AVX-512: float32, and bfloat16 by
bf16 dot products or widened to float32 without them): causal over a cached prefix and the
new tokens, against float32 SDPA within float32's (bfloat16's) rounding; the reference
backend's prefill rows take it where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shard import cpu_kernels
from shard.attention import reference


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    assert module is not None, "the CPU kernels must build here (make install builds them)"
    if not hasattr(module, "prefill_attention"):
        pytest.skip("no AVX-512 on this CPU: prefill rows take SDPA")
    return module


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def dtype(request, kernels):
    if str(request.param).removeprefix("torch.") not in kernels.prefill_dtypes:
        pytest.skip(f"{request.param} prefills take SDPA with this build")
    return request.param


def _within(out, expected, v, dtype) -> bool:
    """Each output within the rounding of its dtype: float32 sums in another order, or
    bfloat16's rounding of the probabilities and of the output."""
    unit = 2**-7 if dtype == torch.bfloat16 else 1e-5
    return bool(
        ((out.float() - expected).abs() <= unit * (expected.abs() + v.float().abs().max())).all()
    )


def _reference(q, k, v, scale):
    """float32 SDPA of q [n, H, D] over k, v [ctx, KVH, D], query i seeing keys <= ctx - n + i."""
    n, ctx = q.shape[0], k.shape[0]
    mask = torch.ones(n, ctx, dtype=torch.bool).tril(ctx - n)
    q, k, v = (t.float().transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize(
    "new, cached, heads, kv_heads, dim",
    [(128, 0, 9, 3, 64), (5, 0, 9, 3, 64), (37, 63, 4, 2, 32), (200, 0, 8, 8, 128),
     (1, 16, 6, 2, 64), (64, 236, 9, 3, 64), (9, 0, 2, 1, 96), (33, 0, 3, 1, 64)],
)  # fmt: skip
def test_prefill_attention_is_causal_sdpa(kernels, dtype, new, cached, heads, kv_heads, dim):
    """Rows past a block of 8 and keys past a pair or a chunk of 16, one KV head per query
    head up to 9 per KV head, head sizes 32-128."""
    gen = torch.Generator().manual_seed(new + cached + dim)
    q = torch.randn(new, heads, dim, generator=gen).to(dtype)
    k = torch.randn(cached + new, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(cached + new, kv_heads, dim, generator=gen).to(dtype)
    out = kernels.prefill_attention(q, k, v, dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert _within(out, _reference(q, k, v, dim**-0.5), v, dtype)


def test_a_strided_query_view_reads_its_own_rows(kernels, dtype):
    """q as a slice of a wider row (the fused QKV output) and k, v as views."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(20, (9 + 2 * 3) * 64, generator=gen).to(dtype)
    q = qkv[:, : 9 * 64].view(20, 9, 64)
    k = qkv[:, 9 * 64 : 12 * 64].view(20, 3, 64)
    v = qkv[:, 12 * 64 :].view(20, 3, 64)
    out = kernels.prefill_attention(q, k, v, 0.125)
    dense = kernels.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.125)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    assert _within(out, _reference(q, k, v, 0.125), v, dtype)


@pytest.mark.parametrize("cached", [0, 21])
def test_the_reference_backend_prefills_through_the_kernel(kernels, dtype, monkeypatch, cached):
    """A request's prefill rows (fresh, or after a cached prefix gathered from its blocks with
    their padding) go through the kernel, and agree with float32 SDPA."""
    calls = []
    original = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *a: calls.append(a) or original(*a))
    gen = torch.Generator().manual_seed(cached)
    new, heads, kv_heads, dim, bs = 11, 9, 3, 64, 16
    q = torch.randn(new, heads, dim, generator=gen).to(dtype)
    k = torch.randn(new, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(new, kv_heads, dim, generator=gen).to(dtype)
    blocks = -(-(cached + new) // bs)
    k_cache = torch.randn(blocks + 1, bs, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks + 1, bs, kv_heads, dim, generator=gen).to(dtype)
    table = torch.arange(1, blocks + 1)
    slots = torch.arange(cached, cached + new) + bs  # block i + 1 holds positions of block i
    k_cache.view(-1, kv_heads, dim)[slots] = k
    v_cache.view(-1, kv_heads, dim)[slots] = v
    if cached:
        key_pos = torch.arange(blocks * bs).unsqueeze(0)
        mask = key_pos <= torch.arange(cached, cached + new).unsqueeze(1)
        row = reference.PrefillRow(0, new, table, mask, cached)
    else:
        row = reference.PrefillRow(0, new, None, None)
    out = torch.empty_like(q)
    reference.attend_prefill_rows(q, k, v, k_cache, v_cache, [row], dim**-0.5, out)
    assert len(calls) == 1 and calls[0][1].shape[0] == cached + new  # padding dropped
    plain = torch.empty_like(q)  # the backend's kernels off (use_cpu_kernel): SDPA
    reference.attend_prefill_rows(q, k, v, k_cache, v_cache, [row], dim**-0.5, plain, kernel=False)
    assert len(calls) == 1
    keys = k_cache[1:].reshape(-1, kv_heads, dim)[: cached + new]
    values = v_cache[1:].reshape(-1, kv_heads, dim)[: cached + new]
    expected = _reference(q, keys, values, dim**-0.5)
    assert _within(out, expected, values, dtype) and _within(plain, expected, values, dtype)


def test_the_start_up_report_names_the_prefill_path(kernels, dtype):
    backend = reference.ReferenceBackend()
    report = backend.prefill_report(dtype, torch.device("cpu"))
    assert report.startswith("C++ kernel")
    tiles = dtype == torch.bfloat16 and kernels.amx_rows > 0 and kernels.amx_ready()
    assert ("on AMX tiles" in report) == tiles
    backend.use_cpu_kernel = False
    assert backend.prefill_report(dtype, torch.device("cpu")) == "SDPA"


@pytest.mark.parametrize(
    "new, cached, dim", [(128, 0, 64), (37, 63, 32), (17, 0, 128), (1, 40, 96)]
)
def test_tiles_agree_with_the_dot_products(kernels, new, cached, dim):
    """bfloat16 on AMX tiles (where this CPU and build have them) against the bf16 dot
    products: both within bfloat16's rounding of float32 SDPA, and of each other."""
    if "bfloat16" not in kernels.prefill_dtypes:
        pytest.skip("bfloat16 prefills take SDPA with this build")
    if not (getattr(kernels, "amx_rows", 0) > 0 and kernels.amx_ready()):
        pytest.skip("no AMX tiles on this CPU or build: bfloat16 takes the dot products only")
    gen = torch.Generator().manual_seed(new * 7 + cached)
    q = torch.randn(new, 6, dim, generator=gen).bfloat16()
    k = torch.randn(cached + new, 2, dim, generator=gen).bfloat16()
    v = torch.randn(cached + new, 2, dim, generator=gen).bfloat16()
    tiles = kernels.prefill_attention(q, k, v, dim**-0.5)
    dots = kernels.prefill_attention(q, k, v, dim**-0.5, tiles=False)
    expected = _reference(q, k, v, dim**-0.5)
    assert _within(tiles, expected, v, torch.bfloat16)
    assert _within(dots, expected, v, torch.bfloat16)
    assert _within(tiles, dots.float(), v, torch.bfloat16)
    assert not torch.equal(tiles, torch.zeros_like(tiles))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_backend_stores_kv_rows_by_the_kernel(kernels, monkeypatch, dtype):
    """K/V rows (strided views of a fused output, as the layers give them) land in their slots
    as `index_copy_` puts them, by one kernel call; rows whose heads are not adjacent take
    the torch path."""
    from shard import cpu_kernels

    calls = []
    original = cpu_kernels.store_kv
    monkeypatch.setattr(cpu_kernels, "store_kv", lambda *a: calls.append(a) or original(*a))
    gen = torch.Generator().manual_seed(5)
    fused = torch.randn(7, 2 * 3 * 64 + 64, generator=gen).to(dtype)
    k = fused[:, : 3 * 64].view(7, 3, 64)
    v = fused[:, 3 * 64 : 6 * 64].view(7, 3, 64)
    slots = torch.tensor([17, 2, 3, 30, 9, 0, 31])
    meta = reference._Metadata(slots, None, False, None, None, [])
    backend = reference.ReferenceBackend()
    caches = [torch.zeros(2, 16, 3, 64, dtype=dtype) for _ in range(4)]
    backend.store_kv(caches[0], caches[1], k, v, meta)
    assert len(calls) == 1
    for cache, rows in ((caches[2], k), (caches[3], v)):
        cache.view(-1, 3, 64).index_copy_(0, slots, rows.contiguous())
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    heads_apart = k.transpose(0, 1).contiguous().transpose(0, 1)  # [T, KVH, D], heads T * D apart
    other = [torch.zeros(2, 16, 3, 64, dtype=dtype) for _ in range(2)]
    backend.store_kv(other[0], other[1], heads_apart, v, meta)
    assert len(calls) == 1 and torch.equal(other[0], caches[0]) and torch.equal(other[1], caches[1])
