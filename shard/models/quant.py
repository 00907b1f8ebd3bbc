"""Weight-only quantization on the fly (`--quantize int8 | int4`): each linear layer of the
decoder quantized as it is loaded, one tensor at a time; embeddings, norms, routers and the
LM head stay in the serving dtype.

- int8: symmetric per output channel, w ~ q * s, q in [-127, 127], s = max|w_row| / 127.
- int4: asymmetric per group of `group_size` inputs (gpt-fast's form, which torch's packed
  kernels read): per group s = (max - min) / 15, z = min + 8 s, q = round((w - min) / s) in
  [0, 15], w ~ (q - 8) s + z.

`dequantize` gives exactly the weights the kernels multiply by: a model whose weights are
replaced by them serves the same tokens in float32 (how the tests check every path).
On CPU the products run in torch's packed weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`); elsewhere the weights are dequantized per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shard.errors import ModelLoadError

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
_INNER_K_TILES = 2  # torch's int4 packing: K must be a multiple of 16 x this


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scales float32 [N])."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int32 [N, K] in 0..15, scales_and_zeros float32 [K / g, N, 2])."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-12)
    zeros = low + 8 * scales
    q = ((w - low) / scales).round().clamp(0, 15).to(torch.int32).view(n, k)
    scales_and_zeros = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scales_and_zeros.shape[0]
    s = scales_and_zeros[..., 0].transpose(0, 1).unsqueeze(-1)  # [N, K/g, 1]
    z = scales_and_zeros[..., 1].transpose(0, 1).unsqueeze(-1)
    return ((q.view(n, groups, k // groups).float() - 8) * s + z).view(n, k)


def dequantize(weight: torch.Tensor, method: str, group_size: int = 128) -> torch.Tensor:
    """The float32 weights a layer quantized by `method` multiplies by."""
    if method == "int8":
        return dequantize_int8(*quantize_int8(weight))
    return dequantize_int4(*quantize_int4(weight, group_size))


def group_for(in_features: int, group_size: int | None, what: str) -> int:
    """A layer's int4 group: `group_size`, or unset the largest of 128, 64, 32 that tiles its
    inputs; groups must tile each rank's inputs (and torch's packing needs K % 32 == 0)."""
    if group_size is None:
        group_size = next((g for g in (128, 64, 32) if in_features % g == 0), 32)
    if in_features % group_size or in_features % (16 * _INNER_K_TILES):
        raise ModelLoadError(
            f"--quantize int4: {what} has {in_features} inputs per shard, not a multiple of "
            f"the group size {group_size}; choose --quantize-group-size from "
            f"{', '.join(str(g) for g in GROUP_SIZES if in_features % g == 0) or 'none'}"
            " or another --num-shard"
        )
    return group_size


class QuantLinear:
    """A weight-only quantized linear layer; `__call__(x [..., in]) -> [..., out]` in x's
    dtype. `weight` is the packed form (for byte counts), `kind` names the path."""

    __slots__ = ("method", "weight", "qparams", "bias", "out_features", "group_size", "packed")

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, method: str, group_size: int
    ) -> None:
        self.method, self.bias, self.group_size = method, bias, group_size
        self.out_features = weight.shape[0]
        self.packed = weight.device.type == "cpu"  # torch's packed CPU kernels
        if method == "int8":
            self.weight, scales = quantize_int8(weight)
            self.qparams = scales.to(weight.dtype)
        else:
            q, scales_and_zeros = quantize_int4(weight, group_size)
            self.qparams = scales_and_zeros.to(weight.dtype)
            self.weight = (
                torch._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
                if self.packed
                else q.to(torch.uint8)  # one byte per weight until a GPU int4 kernel lands
            )

    def keep_inputs(self, start: int, stop: int) -> None:
        """int8: keep input columns start:stop only (a row-parallel rank's share of a layer
        quantized whole, so every rank uses the full rows' scales)."""
        assert self.method == "int8"
        self.weight = self.weight[:, start:stop].contiguous()

    @property
    def kind(self) -> str:
        group = f" (groups of {self.group_size})" if self.method == "int4" else ""
        where = "torch's packed CPU kernel" if self.packed else "dequantized per call"
        return f"{self.method} weight-only{group}, {where}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if not self.packed:
            out = F.linear(flat, self._dequantized(flat.dtype))
        elif self.method == "int8":
            out = torch._weight_int8pack_mm(flat, self.weight, self.qparams)
        else:
            out = torch._weight_int4pack_mm_for_cpu(
                flat, self.weight, self.group_size, self.qparams
            )
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.method == "int8":
            return (self.weight.to(dtype) * self.qparams[:, None]).to(dtype)
        return dequantize_int4(self.weight, self.qparams.float()).to(dtype)


def check_method(method: str | None, group_size: int | None) -> None:
    if method is not None and method not in METHODS:
        raise ModelLoadError(
            f"--quantize {method} is not supported yet; supported: {', '.join(METHODS)} "
            "(weight-only, from a full-precision checkpoint)"
        )
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ModelLoadError(
            f"--quantize-group-size {group_size}: choose {', '.join(map(str, GROUP_SIZES))}"
        )
