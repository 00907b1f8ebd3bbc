"""Phi-3 / 3.5 / 4-mini: Llama's math over fused tensors (`qkv_proj` holds q, k and v rows;
`gate_up_proj` holds gate then up), with longrope and partial rotary from its config."""

from __future__ import annotations

from shard.models.llama import LlamaModel, Plan
from shard.models.weights import Param, Part, Split
from shard.parallel import Parallel
from shard.spec import ModelSpec


def layer_plan(spec: ModelSpec, index: int, parallel: Parallel) -> Plan:
    p = f"model.layers.{index}."
    qkv, gate_up = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    return {
        "qkv": Param(
            (
                Part(qkv, (0, q_rows), spec.num_heads),
                Part(qkv, (q_rows, q_rows + kv_rows), spec.num_kv_heads),
                Part(qkv, (q_rows + kv_rows, q_rows + 2 * kv_rows), spec.num_kv_heads),
            ),
            Split.HEADS,
        ),
        "o_proj": Param.of(p + "self_attn.o_proj.weight", split=Split.COLS),
        "o_bias": Param.of(p + "self_attn.o_proj.bias", optional=True),
        "input_norm": Param.of(p + "input_layernorm.weight"),
        "post_norm": Param.of(p + "post_attention_layernorm.weight"),
        "gate_up": Param(
            (Part(gate_up, (0, inter)), Part(gate_up, (inter, 2 * inter))), Split.ROWS
        ),
        "down": Param.of(p + "mlp.down_proj.weight", split=Split.COLS),
    }


class Model(LlamaModel):
    layer_plan = staticmethod(layer_plan)
