"""Random-weight models of real shapes (Llama, and Qwen3 for a second family), written as
safetensors for the GPU check.

Weights are drawn on the GPU when there is one (an 8B model takes seconds, not minutes),
normal with std 0.02 (norms 1), in bfloat16, and written in shards of at most 4 GiB with
an index, as Hugging Face lays models out. The tokenizer files come from `--tokenizer`
(SmolLM2's); ids past its vocabulary decode to nothing, which benchmarks do not mind.

    python benchmarks/gpu_models.py OUT_DIR --tokenizer DIR [--models smollm2-135m,llama-1b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        rope_scaling=None,
    ),
    "llama-1b": dict(  # Llama-3.2-1B
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
    ),
    "qwen3-0.6b": dict(  # Qwen3-0.6B: heads of 128 over a 1024 hidden, q/k norms per head
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        rope_scaling=None,
        rms_norm_eps=1e-6,
    ),
    "llama-8b": dict(  # Llama-3.1-8B
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHARD_BYTES = 4 << 30


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter names -> shapes (Llama's; Qwen3 adds its per-head q/k norms)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape["vocab_size"], hidden)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        if shape.get("model_type") == "qwen3":
            names |= {p + "self_attn.q_norm.weight": (head_dim,),
                      p + "self_attn.k_norm.weight": (head_dim,)}  # fmt: skip
    names["model.norm.weight"] = (hidden,)
    if not shape["tie_word_embeddings"]:
        names["lm_head.weight"] = (shape["vocab_size"], hidden)
    return names


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_json(shape: dict) -> dict:
    model_type = shape.get("model_type", "llama")
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        **shape,
    }


def build(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    shape = SHAPES[name]
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for tensor_name, dims in tensor_shapes(shape).items():
        if len(dims) == 1:
            value = torch.ones(dims, dtype=torch.bfloat16)
        else:
            drawn = torch.empty(dims, device=device, dtype=torch.bfloat16)
            value = drawn.normal_(0.0, 0.02, generator=gen).cpu()
        nbytes = value.numel() * value.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][tensor_name] = value
        size += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(target / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in tensors}
    index = {"metadata": {}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    (target / "config.json").write_text(json.dumps(config_json(shape), indent=1))
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, target / file)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--models", default="smollm2-135m,llama-1b,llama-8b")
    args = parser.parse_args()
    for name in args.models.split(","):
        start = time.perf_counter()
        path = build(name, args.out, args.tokenizer)
        params = sum(torch.Size(d).numel() for d in tensor_shapes(SHAPES[name]).values())
        print(
            f"{name}: {params / 1e9:.2f}B parameters in {path} ({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()
