"""Linear layers: weight [out, in] (+ bias [out]), applied as y = x W^T + b.

On CPU the weight is reordered once, at load, into oneDNN's blocked layout
(`mkldnn._linear_pointwise`): on a 2-core machine that streams the weights about twice
as fast as the BLAS path of `F.linear` for the 1..64-row inputs of decode. Elsewhere, or
when oneDNN is missing, the plain weight and `F.linear` are used.

Single-row inputs (batch-1 decode) go faster still through our own kernel
(`cpu_kernels.linear_small`, 1.5-2x oneDNN's streaming rate here), which reads the plain
weight: with `gemv` on, a packed layer also keeps its plain weight (the weights' memory twice).
Where oneDNN cannot pack a dtype (bfloat16 on a CPU without AVX-512), the layer keeps only
its plain weight and single rows still go through the kernel, at no extra memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Batch-size hint for oneDNN's weight layout; measured fastest over batches 1..57.
_PACK_HINT = 32
# oneDNN caches one primitive per input shape: row counts above this are padded up to a
# multiple of it, so the cache (and the memory it holds) stays bounded under any traffic.
_ROW_BUCKET = 64
_PACKABLE = (torch.float32, torch.bfloat16)


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """A loaded linear layer; `__call__(x [..., in]) -> [..., out]`."""

    __slots__ = ("weight", "bias", "is_packed", "out_features", "plain", "kernels")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        pack: bool = True,
        gemv: bool = False,
    ) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self.is_packed = pack and _can_pack(weight)
        self.plain: torch.Tensor | None = None  # [out, in] for single-row inputs
        self.kernels: Any = None  # the compiled cpu_kernels module
        if self.is_packed:
            try:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT)
            except RuntimeError:
                self.is_packed = False
        if not self.is_packed:
            self.weight = weight
        if gemv and weight.device.type == "cpu" and weight.dtype in _PACKABLE:
            from shard import cpu_kernels

            self.kernels = cpu_kernels.load()
            if self.kernels is not None:
                # packed: a second, plain copy; unpacked: the same tensor, made contiguous
                self.plain = weight.contiguous()
                if not self.is_packed:
                    self.weight = self.plain

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape.numel() == shape[-1] and self.plain is not None:  # a single row
            out = self.kernels.linear_small(x.reshape(1, shape[-1]), self.plain)
            if self.bias is not None:
                out += self.bias
            return out.view(*shape[:-1], self.out_features)
        if not self.is_packed:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, shape[-1])
        rows = flat.shape[0]
        if rows > _ROW_BUCKET and rows % _ROW_BUCKET:
            flat = F.pad(flat, (0, 0, 0, _ROW_BUCKET - rows % _ROW_BUCKET))
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out[:rows].view(*shape[:-1], self.out_features)
