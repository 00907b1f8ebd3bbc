"""Triton kernels for the element-wise steps of a decoder layer (ops.py's `LayerOps`), one
launch each: residual add + RMSNorm, rotary embedding in place, SiLU(gate) * up.

Arithmetic is float32 in registers; values are rounded to the tensor dtype where Hugging
Face's Llama (and TorchOps) round them: the residual sum, the normalized activations before
the weight, SiLU(gate) before the product, each rotary product before its sum. So compiled,
they give TorchOps' numbers up to the norm's reduction order. They run on CUDA, and on CPU
tensors under TRITON_INTERPRET=1 (how CI checks them against TorchOps).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from shard.models.rope import Rotary


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    delta_ptr,
    weight_ptr,
    sum_ptr,
    out_ptr,
    eps,
    stride_x,
    stride_delta,
    stride_sum,
    stride_out,
    N: tl.constexpr,  # hidden size
    BLOCK: tl.constexpr,  # next power of two >= N
    ADD: tl.constexpr,  # add delta first and store the sum (the new residual)
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        delta = tl.load(delta_ptr + row * stride_delta + offs, mask=mask, other=0.0)
        total = (x + delta.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + offs, total, mask=mask)
        x = total.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / N
    normed = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (normed * weight).to(out_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


# Compiled with fp fusion off: a product fused into the sum (one fma, one rounding) is not
# torch's two rounded products and a rounded sum (seen on an H200: 1-2 ulps apart).
ROTARY_OPTIONS = {"num_warps": 1, "enable_fp_fusion": False}


@triton.jit
def _rotary_kernel(
    x_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_token,
    stride_head,
    HALF: tl.constexpr,  # rotary dims / 2 (the tables' row length); dims past 2 * HALF pass
    BLOCK: tl.constexpr,  # next power of two >= HALF
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + position * HALF + offs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * HALF + offs, mask=mask, other=0.0).to(tl.float32)
    base = x_ptr + token * stride_token + head * stride_head
    x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    t = x_ptr.dtype.element_ty  # each product rounded to it, as the torch form rounds
    first = (x1 * cos).to(t).to(tl.float32) - (x2 * sin).to(t).to(tl.float32)
    second = (x2 * cos).to(t).to(tl.float32) + (x1 * sin).to(t).to(tl.float32)
    tl.store(base + offs, first.to(t), mask=mask)
    tl.store(base + HALF + offs, second.to(t), mask=mask)


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in,
    stride_out,
    INTER: tl.constexpr,  # I: gate is columns [0, I), up [I, 2I)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + INTER + cols, mask=mask, other=0.0)
    out_type = out_ptr.dtype.element_ty
    activated = (gate / (1.0 + tl.exp(-gate))).to(out_type).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (activated * up.to(tl.float32)).to(out_type),
             mask=mask)  # fmt: skip


SILU_BLOCK = 1024


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def norm_launch(x, delta, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, normed), each [T, H] like x; delta None: no add (sum is x itself)."""
    rows, size = x.shape
    out = torch.empty_like(x)
    total = x if delta is None else torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(size)
        other = x if delta is None else delta
        _rms_norm_kernel[(rows,)](
            x, other, weight, total, out, eps,
            x.stride(0), other.stride(0), total.stride(0), out.stride(0),
            N=size, BLOCK=block, ADD=delta is not None, num_warps=_warps(block),
        )  # fmt: skip
    return total, out


class TritonOps:
    """LayerOps with one Triton launch per step (CUDA; CPU under the interpreter)."""

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        assert x.stride(-1) == 1
        return norm_launch(x, None, weight, eps)[1]

    def add_norm(self, hidden, delta, weight, eps):
        assert hidden.stride(-1) == 1 and delta.stride(-1) == 1 and hidden.shape == delta.shape
        return norm_launch(hidden, delta, weight, eps)

    def rotary_state(self, positions: torch.Tensor, rotary: Rotary) -> Any:
        return positions, rotary.cos, rotary.sin  # tables [P, D/2], read per token

    def rotate(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        positions, cos, sin = state
        tokens, heads, head_dim = x.shape
        assert x.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
        if tokens:
            half = cos.shape[1]  # rotary dimensions / 2: the rest of each head passes
            _rotary_kernel[(tokens, heads)](
                x, positions, cos, sin, x.stride(0), x.stride(1),
                HALF=half, BLOCK=triton.next_power_of_2(half), **ROTARY_OPTIONS,
            )  # fmt: skip
        return x

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        inter = width // 2
        assert gate_up.stride(1) == 1
        out = gate_up.new_empty(rows, inter)
        if rows:
            grid = (rows, triton.cdiv(inter, SILU_BLOCK))
            _silu_mul_kernel[grid](
                gate_up, out, gate_up.stride(0), out.stride(0),
                INTER=inter, BLOCK=SILU_BLOCK, num_warps=4,
            )  # fmt: skip
        return out
