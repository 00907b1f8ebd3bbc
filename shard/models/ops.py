"""The element-wise steps of a decoder layer, behind one small interface with three
implementations: `TorchOps` (a few PyTorch ops each; the reference, and any device),
`CpuOps` (the norms in our C++ kernels, the rest as TorchOps) and `TritonOps`
(shard/models/fused.py: one kernel each; CUDA).

A batch-1 decode step on a GPU is mostly fixed costs: each small kernel takes a few
microseconds however little it does, and the torch forms below launch 4 kernels per norm,
2 per residual add, 7 per rotary, 2 per SiLU-gate. The fused forms launch one per step.

Both round where Hugging Face's Llama rounds (the residual sum, the normalized activations,
SiLU(gate) and each rotary product, to the model's dtype), so they agree to reduction order.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from shard.models.rope import Rotary


class LayerOps(Protocol):
    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of x [T, H] in float32, scaled by weight [H]; x's dtype."""
        ...

    def add_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, norm(hidden + delta)); the sum rounded to hidden's dtype first."""
        ...

    def rotary_state(self, positions: torch.Tensor, rotary: Rotary) -> Any:
        """What `rotate` needs for this forward's positions [T], computed once per forward."""
        ...

    def rotate(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        """x [T, heads, D] (rows may be strided) -> rotated; may write into x."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] (gate first) -> SiLU(gate) * up [T, I]."""
        ...


class TorchOps:
    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def add_norm(self, hidden, delta, weight, eps):
        hidden = hidden + delta
        return hidden, self.norm(hidden, weight, eps)

    def rotary_state(self, positions: torch.Tensor, rotary: Rotary) -> Any:
        return rotary.tables(positions)  # cos, sin [T, 1, D/2]

    def rotate(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        cos, sin = state
        return Rotary.apply(x, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuOps(TorchOps):
    """TorchOps with each step in one C++ call (shard/csrc/pointwise.cpp): on CPU each
    small PyTorch op costs a few microseconds however little it does, and `F.rms_norm`
    alone runs as ~6 ops (~60 us for one row of 576), 61 times per SmolLM2 decode step.
    Inputs the kernels do not take (other dtypes, strided rows) go the torch way."""

    _DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels

    def _fits(self, *tensors: torch.Tensor) -> bool:
        x = tensors[0]
        return x.dim() == 2 and x.dtype in self._DTYPES and all(t.is_contiguous() for t in tensors)

    def norm(self, x, weight, eps):
        if x.dim() == 2 and not x.is_contiguous():  # e.g. one KV head's k rows of a batch
            x = x.contiguous()  # the kernel on a copy, as the C++ decode step does
        if not self._fits(x, weight):
            return super().norm(x, weight, eps)
        return self.kernels.rms_norm(x, weight, eps)

    def add_norm(self, hidden, delta, weight, eps):
        if not self._fits(hidden, delta, weight) or delta.dtype != hidden.dtype:
            return super().add_norm(hidden, delta, weight, eps)
        return self.kernels.add_rms_norm(hidden, delta, weight, eps)

    def rotate(self, x, state):
        cos, sin = state  # [T, 1, R / 2]
        if x.dim() != 3 or x.stride(2) != 1 or x.dtype not in self._DTYPES or cos.dtype != x.dtype:
            return super().rotate(x, state)
        return self.kernels.rotate(x, cos.squeeze(1).contiguous(), sin.squeeze(1).contiguous())

    def silu_mul(self, gate_up):
        if not self._fits(gate_up):
            return super().silu_mul(gate_up)
        return self.kernels.silu_mul(gate_up)


def ops_for(device: torch.device) -> LayerOps:
    """Fused kernels on CUDA when Triton is there, the C++ norms on CPU when they build;
    the torch forms otherwise."""
    if device.type == "cuda":
        try:
            from shard.models.fused import TritonOps
        except ImportError:
            return TorchOps()
        return TritonOps()
    if device.type == "cpu":
        from shard import cpu_kernels

        kernels = cpu_kernels.load()
        if kernels is not None:
            return CpuOps(kernels)
    return TorchOps()
