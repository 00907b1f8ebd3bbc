"""Linear layers: weight [out, in] (+ bias [out]), applied as y = x W^T + b.

On CPU the weight is reordered once, at load, into oneDNN's blocked layout
(`mkldnn._linear_pointwise`): on a 2-core machine that streams the weights about twice
as fast as the BLAS path of `F.linear` for the 1..64-row inputs of decode. Elsewhere, or
when oneDNN is missing, the plain weight and `F.linear` are used.

Single-row inputs (batch-1 decode) go faster still through our own kernel
(`cpu_kernels.linear_small`, 1.5-2x oneDNN's streaming rate here), which reads the plain
weight: with `gemv` on, a packed layer also keeps its plain weight (the weights' memory twice).
Where oneDNN cannot pack a dtype (bfloat16 on a CPU without AVX-512), the layer keeps only
its plain weight and single rows still go through the kernel, at no extra memory. Its
products of several rows would go through oneDNN's bfloat16 reference path there, 4-6x
slower than float32 on a 2-core AVX2 EPYC; they go through `cpu_kernels.bf16_linear`
instead (16 rows of the weight at a time widened to float32 into a panel in cache), and past
_WIDEN_ROWS rows through float32 tiles of the weight and torch's float32 GEMM.

With AVX-512 (F and BW), float32 and bfloat16 weights are packed into our own panels
instead of oneDNN's layout (`cpu_kernels.panel_linear`, shard/csrc/panels.cpp; bfloat16 by
bf16 dot products, or widened to float32 in registers where the CPU has none, where oneDNN's
bfloat16 products took 2.7-3.3x float32's time: benchmarks/bf16_cpu.py on a 2-vCPU Xeon
without them), which every input of several rows takes: its products stream the
weights under the arithmetic, 1.3-1.6x faster than oneDNN's at 8-32 rows, within 2-4% of it
at 512-2048 (benchmarks/RESULTS.md). bfloat16 panels take single rows as fast as
`linear_small`, so those layers keep no plain copy: their weights are held once. On a CPU
with AMX (Sapphire Rapids and later) bfloat16 panels are multiplied on its tiles
(shard/csrc/amx.cpp), from the same panels: 3.4-4.6x the dot products' rate at 32 rows,
7.8-10.6x at 128-2048 on a 2-vCPU Xeon.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

# Batch-size hint for oneDNN's weight layout; measured fastest over batches 1..57.
_PACK_HINT = 32
# oneDNN caches one primitive per input shape: row counts above this are padded up to a
# multiple of it, so the cache (and the memory it holds) stays bounded under any traffic.
_ROW_BUCKET = 64
_PACKABLE = (torch.float32, torch.bfloat16)
# Unpacked bfloat16 weights: up to this many rows through `bf16_linear`; more (prefill
# chunks), through float32 tiles of at most _TILE weights and torch's GEMM.
_WIDEN_ROWS = 64
_TILE = 1 << 22


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in oneDNN's packed layout, or None where oneDNN does not pack it here (its
    dtype, or bfloat16 on a CPU without avx512bw/vl/dq or avx_ne_convert: AVX2-only CPUs)."""
    if not _can_pack(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT)
    except RuntimeError:
        return None


class Linear:
    """A loaded linear layer; `__call__(x [..., in]) -> [..., out]`."""

    __slots__ = (
        "weight", "bias", "is_packed", "out_features", "plain", "kernels", "widen", "panels"
    )  # fmt: skip

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        pack: bool = True,
        gemv: bool = False,
        panels: bool = True,
    ) -> None:
        """`pack`: the weight packed (our panels where `panels` and the CPU's build take its
        dtype, else oneDNN's layout); `gemv`: a plain copy kept for single rows (CPU; not
        beside bfloat16 panels, which take single rows as fast)."""
        self.out_features = weight.shape[0]
        self.bias = bias
        self.plain: torch.Tensor | None = None  # [out, in] for single-row inputs
        self.kernels: Any = None  # the compiled cpu_kernels module
        # the weight in panel_linear's panels (float32 [P, in, 16]; bfloat16 [P, in / 2, 16]
        # int32, pairs of inputs), else None
        self.panels: torch.Tensor | None = None
        if pack and panels and weight.device.type == "cpu":
            self.kernels, self.panels = _panels(weight)
        packed = onednn_packed(weight) if self.panels is None and pack else None
        self.is_packed = packed is not None
        self.weight = weight if packed is None else packed
        # bfloat16 panels take single rows as fast as the single-row kernel (bf16 dot
        # products): the layer then holds its weights once, not plain and packed
        rows_in_panels = self.panels is not None and weight.dtype == torch.bfloat16
        if self.panels is not None and rows_in_panels:
            self.weight = self.panels
        if (
            gemv
            and not rows_in_panels
            and weight.device.type == "cpu"
            and weight.dtype in _PACKABLE
        ):
            from shard import cpu_kernels

            self.kernels = cpu_kernels.load()
            if self.kernels is not None:
                # packed: a second, plain copy; unpacked: the same tensor, made contiguous
                self.plain = weight.contiguous()
                if not self.is_packed:
                    self.weight = self.plain
        # bfloat16 products of several rows in float32 where the CPU has no bf16 instructions
        self.widen = self.plain is not None and not self.is_packed
        if self.widen:
            from shard import cpu_kernels

            self.widen = weight.dtype == torch.bfloat16 and not cpu_kernels.has_bf16_instructions()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape.numel() == shape[-1] and self.plain is not None:  # a single row
            out = self.kernels.linear_small(x.reshape(1, shape[-1]), self.plain)
            if self.bias is not None:
                out += self.bias
            return out.view(*shape[:-1], self.out_features)
        if self.panels is not None:  # the bias added after, as after linear_small
            flat = x.reshape(-1, shape[-1])
            out = self.kernels.panel_linear(flat, self.panels, self.out_features)
            if self.bias is not None:
                out += self.bias
            return out.view(*shape[:-1], self.out_features)
        if self.widen:
            return self._widened(x)
        if not self.is_packed:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, shape[-1])
        rows = flat.shape[0]
        if rows > _ROW_BUCKET and rows % _ROW_BUCKET:
            flat = F.pad(flat, (0, 0, 0, _ROW_BUCKET - rows % _ROW_BUCKET))
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out[:rows].view(*shape[:-1], self.out_features)

    def _widened(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ the bfloat16 weight^T in float32 products, in x's dtype; the bias
        added after, as the single-row path adds it."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] <= _WIDEN_ROWS:
            out = self.kernels.bf16_linear(flat, self.plain)
        else:
            out = self._tiled(flat)
        if self.bias is not None:
            out += self.bias
        return out.view(*shape[:-1], self.out_features)

    def _tiled(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [M, K] @ w^T through float32 tiles of whole output rows of w."""
        assert self.plain is not None
        x32 = flat.float()
        inputs = self.plain.shape[1]
        rows = max(1, _TILE // inputs)
        tile = _tile_buffer(min(rows, self.out_features) * inputs)
        out = flat.new_empty(flat.shape[0], self.out_features)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            widened = tile[: (stop - start) * inputs].view(stop - start, inputs)
            widened.copy_(self.plain[start:stop])
            out[:, start:stop] = F.linear(x32, widened)
        return out


def _panels(weight: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
    """(the kernels module, `weight` packed for its panel_linear) where this CPU's build
    takes the weight's dtype (AVX-512: float32; bf16 dot products: bfloat16, inputs paired);
    else (None, None)."""
    from shard import cpu_kernels

    kernels = cpu_kernels.load()
    dtype = str(weight.dtype).removeprefix("torch.")
    if kernels is None or dtype not in getattr(kernels, "panel_dtypes", ()):
        return None, None
    if weight.dtype == torch.bfloat16 and weight.shape[1] % 2:
        return None, None
    return kernels, kernels.pack_panels(weight)


_tiles = threading.local()


def _tile_buffer(count: int) -> torch.Tensor:
    """This thread's float32 scratch of at least `count` elements, kept between calls: a
    fresh 16 MiB tile per call came as new pages from the kernel, zeroed on first touch,
    which cost about as much as the widening itself. A normal tensor even when made under
    inference mode: an inference tensor could not be written outside it later."""
    buffer = getattr(_tiles, "buffer", None)
    if buffer is None or buffer.numel() < count:
        with torch.inference_mode(False):
            buffer = _tiles.buffer = torch.empty(max(count, _TILE), dtype=torch.float32)
    return buffer
