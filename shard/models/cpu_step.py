"""Decode steps of Llama-style models in one C++ call (shard/csrc/decode_step.cpp).

At batch 1 on CPU a decode step is the weights' streaming plus a fixed cost: ~40
Python-level operations per layer (views, splits, kernel calls, the KV store), about 0.2 ms
per layer on a 2-core AVX2 CPU, 6-7 ms of a SmolLM2 step. `CpuDecodeStep` hands the whole
decoder to C++ (`DecodeStack`), which calls the same kernels in the same order as
`LlamaModel.forward` with `CpuOps` and the reference backend's CPU attention, so the hidden
states are bit for bit that path's (tests/test_cpu_step.py compares them).

It serves what that path serves through the same kernels: dense Llama-math decoders (Llama,
Mistral, Qwen2 with its biases, Qwen3 with its per-head norms, Phi-3), float32 or bfloat16,
weights plain (the kept single-row copy, `--cpu-gemv`: batch 1 only, as more rows go to
oneDNN; in panel_linear's panels with AVX-512: any rows) or
int8/int4 in the CPU kernels (up to their 64 rows; in quantized panels: any rows), KV
caches in the model's dtype or fp8,
one shard. Anything else keeps the Python forward; `build` says why.
"""

from __future__ import annotations

from typing import Any

import torch

from shard.attention import AttentionBackend
from shard.attention.reference import ReferenceBackend
from shard.inputs import ForwardInputs
from shard.kv_cache import KVCache
from shard.models.linear import Linear
from shard.models.llama import LlamaModel
from shard.models.mlp import DenseMLP
from shard.models.ops import CpuOps
from shard.models.quant import QuantLinear
from shard.models.weights import RowParallel
from shard.parallel import Parallel

PLAIN, INT8, INT4 = 0, 1, 2  # decode_step.h: Projection::Kind
ANY = 1 << 30  # rows a projection takes with no limit


def _projection(kernels: Any, layer: Any) -> tuple[Any, int] | None:
    """The C++ form of a linear layer whose decode rows go through one of our kernels, and
    up to how many rows they do (plain weights: 1, the single-row kernel, as more go through
    oneDNN; panels: any); None for any other (oneDNN-only weights, fp8, GPTQ
    act-order). One shard: a row-parallel layer's sum over ranks is its own output, its bias
    added after."""
    bias, make = layer.bias, kernels.projection
    if isinstance(layer, RowParallel):
        layer = layer.linear  # its bias is None: RowParallel adds it once, after the sum
    if isinstance(layer, Linear):
        if layer.panels is not None:  # every row count (panel_linear)
            panels, n = layer.panels, layer.out_features
            return make(PLAIN, layer.plain, bias=bias, panels=panels, n=n), ANY
        if layer.plain is None or layer.kernels is None:
            return None
        return make(PLAIN, layer.plain, bias=bias), 1
    if isinstance(layer, QuantLinear) and layer.kernels is kernels and layer.order is None:
        kind = INT8 if layer.method == "int8" else INT4
        if layer.panels:  # every row count (qpanel_linear)
            n = layer.out_features
            return make(kind, None, *layer.qparams, bias=bias, panels=layer.weight, n=n), ANY
        return make(kind, layer.weight, *layer.qparams, bias=bias), layer.kernel_rows
    return None


def _unsupported(model: Any, backend: AttentionBackend, parallel: Parallel) -> str | None:
    """Why the model's decode step cannot run in C++; None when it can."""
    if model.device.type != "cpu" or not isinstance(model.ops, CpuOps):
        return "not on CPU with pytgi's kernels"
    if not isinstance(model, LlamaModel) or type(model).forward is not LlamaModel.forward:
        return f"{type(model).__module__} has its own forward"
    if parallel.world_size != 1:
        return "tensor parallel (the layers all-reduce in Python)"
    if model.dtype not in (torch.float32, torch.bfloat16) or model.rotary.cos.dtype != model.dtype:
        return f"{model.dtype} activations"
    if not isinstance(backend, ReferenceBackend) or not backend.uses_cpu_kernel(model.device):
        return f"attention backend {backend.name} without the CPU kernel"
    if any(not isinstance(layer.mlp, DenseMLP) for layer in model.layers):
        return "mixture-of-experts layers"
    return None


class CpuDecodeStep:
    """`forward(inputs, kv) -> hidden [B, H]` (after the final norm) for a forward of B
    decoding tokens, B <= `max_rows`; writes their K/V into every layer's cache."""

    def __init__(self, model: LlamaModel, stack: Any, max_rows: int) -> None:
        # 1 with plain weights (the Python forward multiplies more rows in oneDNN); quantized
        # ones go through the same kernels at any row count up to their kernels' limit
        self.model, self.stack, self.max_rows = model, stack, max_rows

    @classmethod
    def build(
        cls, model: Any, backend: AttentionBackend, parallel: Parallel
    ) -> tuple[CpuDecodeStep | None, str]:
        """(the step, "") or (None, why the Python forward stays)."""
        reason = _unsupported(model, backend, parallel)
        if reason is not None:
            return None, reason
        try:
            return cls._build(model)
        except RuntimeError as exc:  # a tensor the C++ checks refuse: the Python forward serves
            return None, f"DecodeStack refused the model: {exc}"

    @classmethod
    def _build(cls, model: Any) -> tuple[CpuDecodeStep | None, str]:
        kernels = model.ops.kernels
        stack = kernels.DecodeStack(
            model.num_heads, model.num_kv_heads, model.head_dim, model.spec.rms_norm_eps,
            model.scale, model.norm,
        )  # fmt: skip
        max_rows = ANY
        for index, layer in enumerate(model.layers):
            names = ("qkv", "o_proj", "gate_up", "down")
            layers = (layer.qkv, layer.o_proj, layer.mlp.gate_up, layer.mlp.down)
            projections = []
            for name, linear in zip(names, layers, strict=True):
                made = _projection(kernels, linear)
                if made is None:
                    return None, f"{name} weights as {type(linear).__name__} without a kernel"
                projections.append(made[0])
                max_rows = min(max_rows, made[1])
            window = model.spec.layer_windows[index]
            stack.add_layer(
                layer.input_norm, layer.post_norm, *projections, window, layer.q_norm,
                layer.k_norm,
            )  # fmt: skip
        return cls(model, stack, max_rows), ""

    def forward(self, inputs: ForwardInputs, kv: KVCache) -> torch.Tensor:
        model, attention = self.model, inputs.attention
        cos, sin = model.rotary.tables(inputs.positions)  # [B, 1, R / 2]
        context = torch.tensor(attention.context_lens, dtype=torch.int64)
        # read from the pool each call (a few us): nothing here may keep a freed pool alive
        k_scales, v_scales = [s.k for s in kv.scales], [s.v for s in kv.scales]
        return self.stack.forward(
            model.embed(inputs.input_ids), cos.squeeze(1), sin.squeeze(1),
            attention.slot_mapping, attention.block_tables, context, kv.keys, kv.values,
            k_scales, v_scales,
        )  # fmt: skip
