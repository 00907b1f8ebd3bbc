"""Decode step time of each family next to Llama's, per FLOP (issue 14).

Each family is a random-weight model built by transformers at one size (hidden 512, 4
layers, 8 heads of 64, 4 KV heads, MLP 1536, the SmolLM2 vocabulary; MoE: 8 experts of 768,
top 2), served by a ShardEngine in float32 on CPU. Per family: the median of 30 decode steps
of a batch of 8 requests (32-token prompts), the FLOPs of a step (2 x the weights each token
multiplies: attention, its MLP or its chosen experts, the LM head), and the time per GFLOP
relative to Llama's. The goal: no family above 1.5x.

    .venv/bin/python benchmarks/family_step.py [--batch 8] [--steps 30] [--append]

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_limits import cpu_line  # noqa: E402

from tests.conftest import build_tiny_model  # noqa: E402
from tests.helpers import make_engine, spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SIZE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            head_dim=64, intermediate_size=1536, max_position_embeddings=2048)  # fmt: skip
MOE = dict(num_experts_per_tok=2, intermediate_size=768)
FAMILIES = {
    "llama": ("llama", {}),
    "mistral (window 16)": ("mistral", {"sliding_window": 16}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", {"sliding_window": 16, "query_pre_attn_scalar": 64}),
    "gemma3": ("gemma3_text", {"sliding_window": 16, "query_pre_attn_scalar": 64}),
    "mixtral (8 x 768, top 2)": ("mixtral", {"num_local_experts": 8, **MOE}),
    "qwen3-moe (8 x 768, top 2)": (
        "qwen3_moe",
        {"num_experts": 8, "moe_intermediate_size": 768, "num_experts_per_tok": 2},
    ),
}


def step_flops(config: dict, vocab: int, rows: int) -> float:
    """2 x the weights each token multiplies, x rows."""
    h, d = config["hidden_size"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    attention = h * (heads + 2 * kv) * d + heads * d * h
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if experts:
        inter = config.get("moe_intermediate_size") or config["intermediate_size"]
        mlp = h * experts + config["num_experts_per_tok"] * 3 * h * inter
    else:
        mlp = 3 * h * config["intermediate_size"]
    per_token = config["num_hidden_layers"] * (attention + mlp) + h * vocab
    return 2.0 * per_token * rows


def decode_step_ms(model_dir: Path, batch: int, steps: int) -> float:
    engine = make_engine(model_dir, kv_bytes=256 << 20, max_total=1024)
    prompt = " ".join(str(i) for i in range(40))
    specs = [spec(i, prompt, steps + 4, ignore_eos=True) for i in range(batch)]
    result = engine.prefill(1, specs, None)
    for _ in range(3):  # warm
        result = engine.decode([result.batch.id])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        result = engine.decode([result.batch.id])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    args = parser.parse_args()
    from shard.embedded import default_model_dir

    tokenizer_dir = default_model_dir()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model_type, overrides) in FAMILIES.items():
            model_dir = build_tiny_model(
                Path(tmp) / model_type, tokenizer_dir, model_type, **{**SIZE, **overrides}
            )
            config = json.loads((model_dir / "config.json").read_text())
            ms = decode_step_ms(model_dir, args.batch, args.steps)
            gflops = step_flops({**SIZE, **config}, 49152, args.batch) / 1e9
            per = ms / gflops
            base = base or per
            rows.append(f"| {name} | {ms:.2f} | {gflops:.3f} | {per:.2f} | {per / base:.2f}x |")
            print(rows[-1], flush=True)
    lines = [
        f"### Decode step per family, batch {args.batch} (benchmarks/family_step.py)",
        "",
        f"{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads, float32.",
        "",
        "| family | step ms (median of 30) | GFLOP per step | ms per GFLOP | vs Llama |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
