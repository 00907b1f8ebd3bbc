"""Weight-only quantized linear layers: `--quantize int8 | int4` from a full-precision
checkpoint (each decoder layer quantized as it is loaded, one tensor at a time, and the LM
head in int8), and the same forms read directly from GGUF files (Q8_0, Q4_0, Q4_1).

Forms (scales in float16, as GGUF stores them, but float32 for Q4_K / Q6_K, products of two
scales; int4's mins in float32, which holds GPTQ's and AWQ's -scale * zero exactly; G groups
of g = K / G inputs; the CPU's quantized panels keep both in float16 where each is a float16
value):
- int8: q int8 [N, K], scales [N, G]; w = s q. On the fly: symmetric per output channel
  (G = 1), s = max|w_row| / 127. GGUF Q8_0: groups of 32.
- int4: q uint8 [N, K / 2] in GGML's block layout (blocks of 32 inputs; byte j of a block
  holds input j in its low nibble and input j + 16 in its high nibble), scales and mins
  [N, G]; w = s q + m, q in 0..15. On the fly: per group s = (max - min) / 15, m = min
  (GGUF's Q4_1; Q4_0's w = d (q - 8) is s = d, m = -8 d).

`dequantize_*` give exactly the weights the kernels multiply by: a model whose weights are
replaced by them serves the same tokens in float32 (how the tests check every path).
On CPU the products run in our kernels (`shard/csrc/quant.cpp`: a few rows read the packed
weights once, up to 64 rows multiply panels of 16 rows dequantized at a time; more rows, a
dequantized copy a tile at a time through torch's GEMM). A float32 model's layers are
repacked at load into our quantized panels where the CPU has AVX-512 (F and BW), a bfloat16
model's too (bf16 dot products, or its rows widened to float32 where the CPU has none; the
build's `qpanel_dtypes`; `into_panels`;
shard/models/qpanels.py, shard/csrc/qpanels.cpp): codes in the
order the dot products read them, streamed under the arithmetic, every row count (SmolLM2
decode steps against bfloat16 weights: batch 1 1.7-2.7x, batch 32 0.84-1.00x, where
quant.cpp's products gave 0.51-0.58x; float32 activations at batch 32 0.53-0.55x, from
0.38x; benchmarks/RESULTS.md); on CUDA in Triton
kernels (shard/models/quant_triton.py, any number of rows); elsewhere (or without Triton)
the weights are dequantized per call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from shard.errors import ModelLoadError
from shard.models.qpanels import int4_panels, int8_panels

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
BLOCK = 32  # int4 inputs per GGML block
# Up to this many rows the kernels multiply (shard/csrc/quant.cpp: up to 8 rows read the
# packed weights once per row; more dequantize 16 rows at a time into a panel for a
# register-blocked product); beyond, dequantized tiles of at most _TILE elements go through
# torch's GEMM (prefill chunks). Measured on a 2-core AVX2 EPYC, SmolLM2 decode steps (best
# of 3 rounds), with the earlier register tile (4 rows by 3 weight rows): batch 16 int8 84 ms
# vs 142 ms through tiles (float32 91), batch 32 132 vs 183 (float32 134); per layer, at 128
# rows the tiles won. The panel product is 1.3-1.9x that tile's speed at 9-64 rows. The
# compiled module says its own limit (`max_rows`, shard/csrc/quant.h: every row count with
# AVX-512); this is the limit of a module that does not.
_KERNEL_ROWS = 64
_TILE = 1 << 22


def _halves(values: torch.Tensor) -> torch.Tensor:
    """float32 -> float16, never rounding a nonzero value to zero."""
    tiny = torch.finfo(torch.float16).smallest_normal
    return torch.where(values.abs() < tiny, values.sign() * tiny, values).half()


def quantize_int8(weight: torch.Tensor, group_size: int | None = None):
    """weight [N, K] -> (q int8 [N, K], scales float16 [N, G]); one group per row if unset."""
    n, k = weight.shape
    g = group_size or k
    w = weight.float().view(n, k // g, g)
    scales = _halves(w.abs().amax(dim=-1) / 127)
    q = (w / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.view(n, k), scales


def quantize_int4(weight: torch.Tensor, group_size: int):
    """weight [N, K] -> (q uint8 [N, K / 2], scales float16 [N, G], mins float32 [N, G])."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales, mins = _halves((high - low) / 15), low.contiguous()
    codes = ((w - mins[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
    return pack_int4(codes.to(torch.uint8).view(n, k)), scales, mins


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in 0..15 -> [N, K / 2] in GGML's block layout."""
    n, k = codes.shape
    blocks = codes.view(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 2] in GGML's block layout -> codes uint8 [N, K]."""
    n, half = packed.shape
    blocks = packed.view(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).view(n, 2 * half)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scales.shape[1]
    return (q.view(n, groups, k // groups).float() * scales.float()[..., None]).view(n, k)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
    codes = unpack_int4(packed)
    n, k = codes.shape
    groups = scales.shape[1]
    w = codes.view(n, groups, k // groups).float() * scales.float()[..., None]
    return (w + mins[..., None]).view(n, k)


def dequantize(weight: torch.Tensor, method: str, group_size: int = 128) -> torch.Tensor:
    """The float32 weights a layer quantized on the fly by `method` multiplies by."""
    if method == "int8":
        return dequantize_int8(*quantize_int8(weight))
    return dequantize_int4(*quantize_int4(weight, group_size))


def group_for(in_features: int, group_size: int, what: str) -> int:
    """A layer's int4 group, which must tile each rank's inputs."""
    if in_features % group_size:
        raise ModelLoadError(
            f"--quantize int4: {what} has {in_features} inputs per shard, not a multiple of "
            f"the group size {group_size}; choose --quantize-group-size from "
            f"{', '.join(str(g) for g in GROUP_SIZES if in_features % g == 0) or 'none'}"
            " or another --num-shard"
        )
    return group_size


def _kernels(device: torch.device, in_features: int, group_size: int) -> Any:
    """The products' kernels: pytgi's C++ ones on CPU (`max_rows` _KERNEL_ROWS), Triton's
    on CUDA (any rows; inputs and groups in whole blocks of 32, so not GGUF Q6_K's groups
    of 16); None: dequantize per call."""
    if device.type == "cuda" and in_features % 32 == 0 and group_size % 32 == 0:
        try:
            from shard.models.quant_triton import TritonQuant
        except ImportError:
            return None
        return TritonQuant()
    if device.type != "cpu":
        return None
    from shard import cpu_kernels

    return cpu_kernels.load()


class QuantLinear:
    """A weight-only quantized linear layer; `__call__(x [..., in]) -> [..., out]` in x's
    dtype. `weight` is the packed tensor, `qparams` its scales (and int4's mins)."""

    __slots__ = (
        "method",
        "weight",
        "qparams",
        "bias",
        "order",
        "out_features",
        "group_size",
        "kernels",
        "panels",
    )

    def __init__(
        self,
        method: str,
        weight: torch.Tensor,
        qparams: tuple[torch.Tensor, ...],
        bias: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
        kernels: bool = True,
    ) -> None:
        """`order` [K]: the weights' columns are the inputs in this order (GPTQ act-order);
        `kernels` False: dequantize per call (--disable-custom-kernels)."""
        self.method, self.weight, self.qparams, self.bias = method, weight, qparams, bias
        self.order = order
        self.out_features = weight.shape[0]
        inputs = weight.shape[1] * (2 if method == "int4" else 1)
        self.group_size = inputs // qparams[0].shape[1]
        self.kernels: Any = _kernels(weight.device, inputs, self.group_size) if kernels else None
        # True once `weight` and `qparams` are in qpanel_linear's panels (`into_panels`)
        self.panels = False

    def into_panels(self) -> bool:
        """Repack the weights for `qpanel_linear` (bfloat16 or float32 inputs; the layer holds
        them once, packed) where the CPU's build has it and the groups fit (int4: groups of
        a multiple of 16 inputs); whether it did."""
        kernels, k = self.kernels, self.group_size * self.qparams[0].shape[1]
        if not hasattr(kernels, "qpanel_linear") or self.panels or k % 4:
            return False
        if self.method == "int4" and self.group_size % 16:  # the kernel's sums of x
            return False
        if self.method == "int8":
            self.weight, scales = int8_panels(self.weight, self.qparams[0])
            self.qparams = (scales,)
        else:
            codes = unpack_int4(self.weight)
            self.weight, *params = int4_panels(codes, *self.qparams)
            self.qparams = tuple(params)
        self.panels = True
        return True

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        method: str,
        group_size: int,
        kernels: bool = True,
    ) -> QuantLinear:
        """`weight` [N, K] quantized on the fly (int8 per output channel; int4 in groups)."""
        if method == "int8":
            q, scales = quantize_int8(weight)
            return cls("int8", q, (scales,), bias, kernels=kernels)
        packed, scales, mins = quantize_int4(weight, group_size)
        return cls("int4", packed, (scales, mins), bias, kernels=kernels)

    def keep_inputs(self, start: int, stop: int) -> None:
        """Per-channel int8: keep input columns start:stop only (a row-parallel rank's share
        of a layer quantized whole, so every rank uses the full rows' scales)."""
        assert self.method == "int8" and self.qparams[0].shape[1] == 1 and not self.panels
        self.weight = self.weight[:, start:stop].contiguous()
        self.group_size = stop - start

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, *self.qparams))

    @property
    def kind(self) -> str:
        group = f" (groups of {self.group_size})" if self.method == "int4" else ""
        where = getattr(self.kernels, "name", "pytgi's CPU kernels")
        if self.kernels is None:
            where = "dequantized per call"
        if self.panels:
            where = "our quantized panels (C++ qpanel_linear)"
        return f"{self.method} weight-only{group}, {where}"

    @property
    def kernel_rows(self) -> int:
        """Inputs of up to this many rows go through the kernels; more, through tiles."""
        return getattr(self.kernels, "max_rows", _KERNEL_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.order is not None:
            flat = flat.index_select(1, self.order)
        if self.panels:  # every row count; bfloat16 or float32 (qpanel_linear refuses others)
            mins = self.qparams[1] if self.method == "int4" else None
            out = self.kernels.qpanel_linear(
                flat, self.weight, self.qparams[0], mins, self.out_features
            )
        elif self.kernels is not None and flat.shape[0] <= self.kernel_rows:
            if self.method == "int8":
                out = self.kernels.q8_linear(flat, self.weight, *self.qparams)
            else:
                out = self.kernels.q4_linear(flat, self.weight, *self.qparams)
        else:
            out = self._tiled(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def _tiled(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [M, K] @ w^T through dequantized tiles of whole output rows."""
        rows = max(1, _TILE // (self.weight.shape[1] * (2 if self.method == "int4" else 1)))
        if rows >= self.out_features:
            return F.linear(flat, self._dequantized(0, self.out_features, flat))
        out = flat.new_empty(flat.shape[0], self.out_features)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            out[:, start:stop] = F.linear(flat, self._dequantized(start, stop, flat))
        return out

    def _dequantized(self, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
        weight = self.weight[start:stop]
        params = [p[start:stop] for p in self.qparams]
        if self.kernels is not None:
            if self.method == "int8":
                return self.kernels.q8_dequantize(weight, *params, like)
            return self.kernels.q4_dequantize(weight, *params, like)
        if self.method == "int8":
            return dequantize_int8(weight, *params).to(like.dtype)
        return dequantize_int4(weight, *params).to(like.dtype)


def check_method(method: str | None, group_size: int) -> None:
    if method is not None and method not in (*METHODS, "fp8"):
        raise ModelLoadError(
            f"--quantize {method} is not supported yet; supported: {', '.join(METHODS)} "
            "(weight-only, from a full-precision checkpoint) and fp8 (GPUs with fp8 products)"
        )
    if group_size not in GROUP_SIZES:
        raise ModelLoadError(
            f"--quantize-group-size {group_size}: choose {', '.join(map(str, GROUP_SIZES))}"
        )
