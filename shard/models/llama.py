"""The Llama decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with its qkv bias, Qwen3 with its
per-head q/k norms; Mixtral, Qwen2-MoE and Qwen3-MoE with experts in place of the MLP) and
the weight plan that feeds it.

Math only: `forward(input_ids, positions, attention metadata, kv cache) -> hidden`, logits
only for the rows that need them. Which tensors each parameter reads and how it is split
over ranks is `layer_plan`; where ranks combine is declared there (shard/models/weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.attention import AttentionBackend, AttentionMetadata
from shard.errors import ModelLoadError
from shard.kv_cache import KVCache
from shard.models.mlp import DenseMLP, SparseMoE, load_mlp, mlp_plan
from shard.models.ops import LayerOps
from shard.models.rope import Rotary
from shard.models.weights import Loader, Param, Projection, Split, local_heads
from shard.parallel import Parallel
from shard.spec import ModelSpec

Plan = dict[str, Param]


def attention_plan(spec: ModelSpec, prefix: str, qk_norm: bool = False) -> Plan:
    """q/k/v packed by heads (with their biases when the model has them), o by columns;
    with `qk_norm`, the per-head q and k norm weights."""
    heads = [("q_proj", spec.num_heads), ("k_proj", spec.num_kv_heads)]
    heads.append(("v_proj", spec.num_kv_heads))
    plan = {
        "qkv": Param.heads(*((f"{prefix}{n}.weight", h) for n, h in heads)),
        "o_proj": Param.of(prefix + "o_proj.weight", split=Split.COLS),
        "o_bias": Param.of(prefix + "o_proj.bias", optional=True),  # attention_bias (Llama)
    }
    if spec.qkv_bias:
        plan["qkv_bias"] = Param.heads(*((f"{prefix}{n}.bias", h) for n, h in heads))
    if qk_norm:
        plan["q_norm"] = Param.of(prefix + "q_norm.weight")
        plan["k_norm"] = Param.of(prefix + "k_norm.weight")
    return plan


def layer_plan(spec: ModelSpec, index: int, parallel: Parallel) -> Plan:
    p = f"model.layers.{index}."
    qk_norm = spec.config.get("model_type") in ("qwen3", "qwen3_moe")
    return {
        **attention_plan(spec, p + "self_attn.", qk_norm=qk_norm),
        "input_norm": Param.of(p + "input_layernorm.weight"),
        "post_norm": Param.of(p + "post_attention_layernorm.weight"),
        **mlp_plan(spec, index, parallel),
    }


@dataclass(slots=True)
class Layer:
    input_norm: torch.Tensor  # [hidden]
    qkv: Projection  # [(heads + 2 * kv_heads) * D, hidden] (+ bias), this rank's heads
    o_proj: Projection  # [hidden, heads * D], this rank's columns, all-reduced
    post_norm: torch.Tensor  # [hidden]
    mlp: DenseMLP | SparseMoE  # [T, hidden] -> [T, hidden], summed over ranks
    q_norm: torch.Tensor | None = None  # [D], Qwen3: RMSNorm of each q head before RoPE
    k_norm: torch.Tensor | None = None  # [D], and of each k head


def load_layer(loader: Loader, spec: ModelSpec, plan: Plan, ops: LayerOps) -> Layer:
    bias = plan.get("qkv_bias")
    optional = {n: loader.tensor(plan[n]) for n in ("q_norm", "k_norm") if n in plan}
    return Layer(
        input_norm=loader.tensor(plan["input_norm"]),
        qkv=loader.linear(plan["qkv"], bias),
        o_proj=loader.linear(plan["o_proj"], plan["o_bias"]),
        post_norm=loader.tensor(plan["post_norm"]),
        mlp=load_mlp(loader, spec, plan, ops),
        **optional,
    )


class LlamaModel:
    """`layer_plan` is the family's: a family with Llama's math and other tensor names
    (Phi-3's fused projections) only overrides it."""

    layer_plan = staticmethod(layer_plan)

    def __init__(self, spec: ModelSpec, loader: Loader, ops: LayerOps) -> None:
        activation = spec.config.get("hidden_act", "silu")
        if activation != "silu":
            raise ModelLoadError(f"hidden_act {activation!r} is not supported here (only silu)")
        self.spec, self.ops = spec, ops
        self.dtype, self.device, parallel = loader.dtype, loader.device, loader.parallel
        self.num_heads = spec.num_heads // parallel.world_size
        self.num_kv_heads = local_heads(spec.num_kv_heads, parallel)[1]
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.embed = loader.embedding("model.embed_tokens.weight", spec.vocab_size)
        self.lm_head = loader.head("lm_head.weight", self.embed, spec.tie_word_embeddings)
        plans = [self.layer_plan(spec, i, parallel) for i in range(spec.num_layers)]
        self.layers = [load_layer(loader, spec, plan, ops) for plan in plans]
        # experts are chosen per token on the host, which a captured graph cannot replay
        self.supports_cuda_graphs = not any(isinstance(x.mlp, SparseMoE) for x in self.layers)
        self.norm = loader.tensor(Param.of("model.norm.weight"))
        self.weight_bytes = loader.nbytes
        self.rotary = Rotary.for_model(spec, self.dtype, self.device)

    def _qk_norm(self, qk: torch.Tensor, layer: Layer) -> torch.Tensor:
        """Qwen3: each q and k head [T, heads, D] RMS-normalized with its own weight."""
        assert layer.q_norm is not None and layer.k_norm is not None
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        eps, shape = self.spec.rms_norm_eps, (-1, self.head_dim)
        q = self.ops.norm(q.reshape(shape), layer.q_norm, eps).view(q.shape)
        k = self.ops.norm(k.reshape(shape), layer.k_norm, eps).view(k.shape)
        return torch.cat([q, k], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids, positions (rotary indices, shard/models/rope.py): [T] -> hidden states
        [T, hidden] after the final norm.

        `meta` is `backend.prepare(...)` of this forward's layout. No host work happens
        here beyond launching ops, so a decode forward can be captured in a CUDA graph."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        rotary = ops.rotary_state(positions, self.rotary)
        hidden = self.embed(input_ids)  # [T, hidden]: the residual stream
        num_q = self.num_heads * self.head_dim
        num_kv = self.num_kv_heads * self.head_dim
        num_tokens = input_ids.shape[0]
        pending = None  # the last MLP's output, added to the residual by the next norm
        for index, layer in enumerate(self.layers):
            if pending is None:
                x = ops.norm(hidden, layer.input_norm, eps)
            else:
                hidden, x = ops.add_norm(hidden, pending, layer.input_norm, eps)
            qkv = layer.qkv(x)  # [T, (H + 2 KVH) D]
            qk, v = qkv.split([num_q + num_kv, num_kv], dim=-1)
            qk = qk.view(num_tokens, -1, self.head_dim)  # q heads, then k heads
            if layer.q_norm is not None:
                qk = self._qk_norm(qk, layer)
            q, k = ops.rotate(qk, rotary).split([self.num_heads, self.num_kv_heads], dim=1)
            v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            k_cache, v_cache = kv_cache.layer(index)
            scales = kv_cache.scales[index]
            backend.store_kv(k_cache, v_cache, k, v, meta, scales)
            window = self.spec.layer_windows[index]
            attn = backend.attend(
                q, k, v, k_cache, v_cache, meta, self.scale, window, scales=scales
            )
            out = layer.o_proj(attn.reshape(num_tokens, num_q))
            hidden, x = ops.add_norm(hidden, out, layer.post_norm, eps)
            pending = layer.mlp(x)
        if pending is None:
            return ops.norm(hidden, self.norm, eps)
        return ops.add_norm(hidden, pending, self.norm, eps)[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab] over the whole vocabulary."""
        return self.lm_head(hidden)


Model = LlamaModel
