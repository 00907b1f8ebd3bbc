"""Gemma, Gemma 2 and Gemma 3 text (`Gemma3ForCausalLM`).

What sets them apart from Llama, each as transformers computes it:
- RMSNorm scaled by (1 + w), the product taken in float32 before rounding;
- embeddings times sqrt(hidden), that factor rounded to the model's dtype first;
- GeGLU: gelu(gate) * up (tanh approximation, `gelu_pytorch_tanh`);
- Gemma 2/3: a norm after attention and one after the MLP as well as before each;
  queries scaled by `query_pre_attn_scalar`; layers alternating sliding-window and global
  attention (`layer_types`);
- Gemma 2: attention scores and final logits soft-capped (softcap * tanh(x / softcap));
- Gemma 3: per-head q/k norms, and sliding layers rotate with `rope_local_base_freq` while
  global ones use `rope_theta` and `rope_scaling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard.attention import AttentionBackend, AttentionMetadata
from shard.errors import ModelLoadError
from shard.kv_cache import KVCache
from shard.models.llama import Plan, attention_plan
from shard.models.ops import LayerOps
from shard.models.rope import Rotary
from shard.models.weights import Loader, Param, Projection, Split, local_heads
from shard.spec import ModelSpec

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def layer_plan(spec: ModelSpec, index: int) -> Plan:
    p = f"model.layers.{index}."
    plan = {
        **attention_plan(
            spec, p + "self_attn.", qk_norm=spec.config["model_type"] == "gemma3_text"
        ),
        "input_norm": Param.of(p + "input_layernorm.weight"),
        "post_attention_norm": Param.of(p + "post_attention_layernorm.weight"),
        "gate_up": Param.of(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", split=Split.ROWS),
        "down": Param.of(p + "mlp.down_proj.weight", split=Split.COLS),
    }
    if spec.config["model_type"] != "gemma":  # Gemma 2 and 3: norms around the MLP too
        plan["pre_mlp_norm"] = Param.of(p + "pre_feedforward_layernorm.weight")
        plan["post_mlp_norm"] = Param.of(p + "post_feedforward_layernorm.weight")
    return plan


@dataclass(slots=True)
class Layer:
    input_norm: torch.Tensor  # [hidden] float32: 1 + w
    qkv: Projection  # this rank's q, k, v heads
    o_proj: Projection
    post_attention_norm: torch.Tensor  # Gemma: before the MLP; Gemma 2/3: after attention
    gate_up: Projection
    down: Projection
    pre_mlp_norm: torch.Tensor | None = None  # Gemma 2/3
    post_mlp_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [D] Gemma 3
    k_norm: torch.Tensor | None = None


def _scale(loader: Loader, param: Param) -> torch.Tensor:
    """A Gemma norm's weight as the factor it multiplies by: 1 + w, in float32."""
    return 1.0 + loader.tensor(param).float()


def load_layer(loader: Loader, plan: Plan) -> Layer:
    norms = ("input_norm", "post_attention_norm", "pre_mlp_norm", "post_mlp_norm")
    scales = {n: _scale(loader, plan[n]) for n in (*norms, "q_norm", "k_norm") if n in plan}
    return Layer(
        qkv=loader.linear(plan["qkv"], plan.get("qkv_bias")),
        o_proj=loader.linear(plan["o_proj"], plan["o_bias"]),
        gate_up=loader.linear(plan["gate_up"]),
        down=loader.linear(plan["down"]),
        **scales,
    )


def gemma_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., H] in float32 times `scale` (1 + w, float32), then x's dtype."""
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * scale).to(x.dtype)


class Model:
    def __init__(self, spec: ModelSpec, loader: Loader, ops: LayerOps) -> None:
        config = spec.config
        activation = config.get("hidden_activation") or config.get("hidden_act")
        if activation not in ACTIVATIONS:
            raise ModelLoadError(
                f"hidden activation {activation!r} is not supported; supported: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if config.get("use_bidirectional_attention"):
            raise ModelLoadError("use_bidirectional_attention (an encoder) is not supported")
        self.spec, self.ops, self.act = spec, ops, ACTIVATIONS[activation]
        self.dtype, self.device, parallel = loader.dtype, loader.device, loader.parallel
        self.num_heads = spec.num_heads // parallel.world_size
        self.num_kv_heads = local_heads(spec.num_kv_heads, parallel)[1]
        self.head_dim = spec.head_dim
        self.scale = config.get("query_pre_attn_scalar", spec.head_dim) ** -0.5
        self.attn_softcap = float(config.get("attn_logit_softcapping") or 0.0)
        self.logit_softcap = float(config.get("final_logit_softcapping") or 0.0)
        self.embed = loader.embedding("model.embed_tokens.weight", spec.vocab_size)
        self.normalizer = torch.tensor(spec.hidden_size**0.5, dtype=self.dtype)
        self.lm_head = loader.head("lm_head.weight", self.embed, spec.tie_word_embeddings)
        plans = [layer_plan(spec, i) for i in range(spec.num_layers)]
        self.layers = [load_layer(loader, plan) for plan in plans]
        self.norm = _scale(loader, Param.of("model.norm.weight"))
        self.weight_bytes = loader.nbytes
        types = config.get("layer_types") or ["full_attention"] * spec.num_layers
        self.sliding = [t == "sliding_attention" for t in types]  # local RoPE in Gemma 3
        self.rotary = Rotary.for_model(spec, self.dtype, self.device)  # global layers' (all)
        self.local_rotary = self.rotary
        if "rope_local_base_freq" in config:  # Gemma 3: sliding layers rotate by their own
            theta = float(config["rope_local_base_freq"])
            self.local_rotary = Rotary.for_model(spec, self.dtype, self.device, theta=theta)

    def _attention(self, x, layer: Layer, index: int, rotary, meta, kv_cache, backend):
        """x [T, hidden] (normed) -> attention output [T, hidden], summed over ranks."""
        eps, num_tokens = self.spec.rms_norm_eps, x.shape[0]
        num_q = self.num_heads * self.head_dim
        num_kv = self.num_kv_heads * self.head_dim
        q, k, v = layer.qkv(x).split([num_q, num_kv, num_kv], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = gemma_norm(q, layer.q_norm, eps), gemma_norm(k, layer.k_norm, eps)
        qk = self.ops.rotate(torch.cat([q, k], dim=1), rotary)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        k_cache, v_cache = kv_cache.layer(index)
        scales = kv_cache.scales[index]
        backend.store_kv(k_cache, v_cache, k, v, meta, scales)
        window, softcap = self.spec.layer_windows[index], self.attn_softcap
        attn = backend.attend(
            q, k, v, k_cache, v_cache, meta, self.scale, window, softcap, scales=scales
        )
        return layer.o_proj(attn.reshape(num_tokens, num_q))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids, positions (rotary indices): [T] -> hidden states [T, hidden], normed."""
        eps = self.spec.rms_norm_eps
        rotary = self.ops.rotary_state(positions, self.rotary)
        local = rotary
        if self.local_rotary is not self.rotary:
            local = self.ops.rotary_state(positions, self.local_rotary)
        hidden = self.embed(input_ids) * self.normalizer  # [T, hidden]: the residual stream
        for index, layer in enumerate(self.layers):
            state = local if self.sliding[index] else rotary
            x = gemma_norm(hidden, layer.input_norm, eps)
            out = self._attention(x, layer, index, state, meta, kv_cache, backend)
            if layer.pre_mlp_norm is None:  # Gemma
                hidden = hidden + out
                x = gemma_norm(hidden, layer.post_attention_norm, eps)
            else:
                hidden = hidden + gemma_norm(out, layer.post_attention_norm, eps)
                x = gemma_norm(hidden, layer.pre_mlp_norm, eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            out = layer.down(self.act(gate) * up)
            if layer.post_mlp_norm is not None:
                out = gemma_norm(out, layer.post_mlp_norm, eps)
            hidden = hidden + out
        return gemma_norm(hidden, self.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], soft-capped for Gemma 2."""
        logits = self.lm_head(hidden)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
