"""fp8 linear layers on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper):
`--quantize fp8` from a full-precision checkpoint (as TGI's), and fp8 checkpoints whose
scales are per tensor or per output channel, served as they are stored.

Weights: float8 e4m3fn [N, K] and a float32 scale per output channel [N] (a per-tensor scale
repeated; so fused q/k/v with their own scales concatenate). Activations: each row quantized
on every call with its own scale, max|x_row| / 448 (dynamic, as TGI's fp8 path; no host
work, so CUDA graphs capture it). The product is `torch._scaled_mm` with row-wise scales:
out[m, n] = sx[m] sw[n] sum_k xq[m, k] wq[n, k], accumulated in float32.

On CPU PyTorch's fp8 products measured ~40x slower than float32 (7.5 ms vs 0.17 ms for one
SmolLM2 layer at batch 1): `--quantize fp8` is refused there and fp8 checkpoints are
multiplied out on load (shard/prequantized.py).
"""

from __future__ import annotations

import torch

from shard.errors import ModelLoadError
from shard.kv_cache import FP8, FP8_MAX

_TINY = 1e-12  # the smallest scale: an all-zero row stays zeros


def fp8_products(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 matrices natively."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, 1]): x ~ q * scale, row by row."""
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    q = (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scales


def _fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows on CUDA in one Triton launch (the torch form is ~6 kernels a layer)."""
    from shard.models.quant_triton import fp8_rows

    return fp8_rows(x if x.stride(-1) == 1 else x.contiguous(), FP8_MAX, _TINY)


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8 [N, K] and scales [N] or [N, 1] -> float32 [N, K]."""
    return q.float() * scales.float().view(-1, 1)


class Fp8Linear:
    """`__call__(x [..., K]) -> [..., N]` in x's dtype through torch._scaled_mm."""

    __slots__ = ("weight", "scales", "bias", "out_features")
    kind = "fp8 weights and activations (per-channel and per-row scales), torch._scaled_mm"

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        """weight fp8 [N, K]; scales [N] (or one per tensor, repeated)."""
        n, k = weight.shape
        if n % 16 or k % 16:
            raise ModelLoadError(
                f"fp8 products need multiples of 16 ([{n}, {k}] is not); serve this model "
                "without --quantize fp8 or with another --num-shard"
            )
        self.weight = weight.contiguous()
        self.scales = scales.float().reshape(-1).expand(n).reshape(1, n).contiguous()  # [1, N]
        self.bias, self.out_features = bias, n

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Fp8Linear:
        """weight [N, K] (any float dtype) -> per-output-channel fp8."""
        q, scales = quantize_rows(weight)
        return cls(q, scales, bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        q, scales = _fp8_rows(rows) if x.is_cuda else quantize_rows(rows)
        # CUDA's row-wise scaled products write bfloat16 only
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        out = torch._scaled_mm(
            q, self.weight.t(), scale_a=scales, scale_b=self.scales, out_dtype=out_dtype
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)
