"""The element-wise steps of a decoder layer, behind one small interface with two
implementations: `TorchOps` (a few PyTorch ops each; CPU, and the reference) and
`TritonOps` (shard/models/fused.py: one kernel each; CUDA).

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


def ops_for(device: torch.device) -> LayerOps:
    """Fused kernels on CUDA when Triton is there; the torch forms elsewhere."""
    if device.type == "cuda":
        try:
            from shard.models.fused import TritonOps
        except ImportError:
            return TorchOps()
        return TritonOps()
    return TorchOps()
