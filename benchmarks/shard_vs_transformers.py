"""Shard engine vs transformers on the same SmolLM2-135M weights, in one process run.

Decode: milliseconds per step at batch 1, 8 and 32, prompts of 128 tokens, context growing
to 256 (128 decode steps). Prefill: tokens/s for 512-token prompts. Same dtype and threads
for both. Prints a Markdown table; `--append` adds it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from common.config import ShardConfig
from shard.batch import RequestSpec
from shard.embedded import default_model_dir
from shard.engine import ShardEngine
from shard.sampling import SamplingParams

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _prompt_ids(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=gen).tolist()


def ours_decode(engine: ShardEngine, prompts: list[list[int]], steps: int) -> float:
    specs = [
        RequestSpec(
            id=i,
            inputs="",
            input_ids=p,
            sampling=SamplingParams(),
            max_new_tokens=steps + 1,
            ignore_eos=True,
        )
        for i, p in enumerate(prompts)
    ]
    engine.prefill(1, specs, None)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.decode([1])
        times.append(time.perf_counter() - start)
    engine.clear(None)
    return statistics.mean(times) * 1000


def ours_prefill(engine: ShardEngine, prompts: list[list[int]]) -> float:
    specs = [
        RequestSpec(id=i, inputs="", input_ids=p, sampling=SamplingParams(), max_new_tokens=1)
        for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    engine.prefill(1, specs, None)
    elapsed = time.perf_counter() - start
    engine.clear(None)
    return sum(len(p) for p in prompts) / elapsed


def hf_decode(model, prompts: list[list[int]], steps: int) -> float:
    """Per-step time of transformers' own generate loop (static batch, no padding needed)."""
    ids = torch.tensor(prompts)
    stamps: list[float] = []

    class Clock:
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            stopping_criteria=[Clock()],
            pad_token_id=0,
        )
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.mean(gaps) * 1000


def hf_prefill(model, prompts: list[list[int]]) -> float:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        elapsed = time.perf_counter() - start
    return ids.numel() / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prefill-prompt", type=int, default=512)
    parser.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model_dir = default_model_dir()
    dtype = getattr(torch, args.dtype)
    engine = ShardEngine(
        ShardConfig(model_dir=str(model_dir), dtype=args.dtype, kv_cache_memory=2 << 30)
    )
    engine.warmup([], None, 512, 2048)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    vocab = engine.model_spec.vocab_size
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = _prompt_ids(batch, args.prompt, vocab, seed=batch)
        ours_decode(engine, prompts, 4)  # warm caches and allocator
        ours = ours_decode(engine, prompts, args.steps)
        theirs = hf_decode(hf, prompts, args.steps)
        rows.append((f"decode ms/step, batch {batch}", ours, theirs, theirs / ours))
    prompts = _prompt_ids(1, args.prefill_prompt, vocab, seed=0)
    ours_prefill(engine, prompts)
    ours = max(ours_prefill(engine, prompts) for _ in range(3))
    theirs = max(hf_prefill(hf, prompts) for _ in range(3))
    rows.append(
        (f"prefill tokens/s, {args.prefill_prompt}-token prompt", ours, theirs, ours / theirs)
    )
    table = [
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, dtype {args.dtype}",
        "",
        "| measure | pytgi shard | transformers | advantage (x) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {a:.1f} | {b:.1f} | {r:.2f} |" for name, a, b, r in rows],
    ]
    text = "\n".join(table)
    print(text)
    if args.append:
        with RESULTS.open("a") as f:
            f.write(f"\n### Shard vs transformers ({time.strftime('%Y-%m-%d')})\n\n")
            f.write(
                "Command: `python benchmarks/shard_vs_transformers.py "
                f"--dtype {args.dtype}`\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
