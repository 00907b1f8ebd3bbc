"""Decode steps over a float32 KV cache and an fp8 one (--kv-cache-dtype fp8_e4m3fn),
SmolLM2-135M in float32 on CPU (issue 16).

Per cache dtype, a ShardEngine on the embedded model: the median decode step of `--batch`
requests whose contexts hold `--context` tokens (attention reads every cached key once per
step: the part of the step the cache dtype changes) and of one short request (where it
changes nothing), the KV bytes per token and the tokens a 1 GiB pool holds. The two
configurations take turns over `--rounds` rounds; each keeps its fastest median.

    .venv/bin/python benchmarks/kv_fp8.py [--batch 8] [--context 1536] [--rounds 3] [--append]

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_limits import cpu_line  # noqa: E402
from quant_step import decode_ms  # noqa: E402

from shard.kv_cache import KVCache  # noqa: E402
from tests.helpers import make_engine, spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CONFIGS = {"float32": {}, "fp8_e4m3fn": {"kv_cache_dtype": "fp8_e4m3fn"}}


def step_ms(engine, batch: int, context: int, steps: int) -> float:
    """Median decode step of `batch` requests of `context` prompt tokens each."""
    specs = [
        spec(i, "", steps + 4, ignore_eos=True, input_ids=[(1000 + 7 * i + t) % 40000 + 100
                                                           for t in range(context)])
        for i in range(batch)
    ]  # fmt: skip
    return decode_ms(engine, specs, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    args = parser.parse_args()
    from shard.embedded import default_model_dir

    model_dir = default_model_dir()
    total = args.context + args.steps + 8
    kv_bytes = (args.batch + 1) * total * 2 * 30 * 3 * 64 * 4 * 2  # float32 pool, with room
    engines = {
        name: make_engine(model_dir, kv_bytes=kv_bytes, max_total=total + 16, **options)
        for name, options in CONFIGS.items()
    }
    times = {name: (float("inf"), float("inf")) for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, engine in engines.items():
            long = step_ms(engine, args.batch, args.context, args.steps)
            short = step_ms(engine, 1, 20, args.steps)
            times[name] = (min(times[name][0], long), min(times[name][1], short))
            print(f"round {round_ + 1}: {name}: {long:.1f} / {short:.1f} ms", flush=True)
    rows = []
    base = times["float32"]
    for name, engine in engines.items():
        kv = engine.runner.kv
        per_token = KVCache.bytes_per_block(
            len(kv.keys), 1, kv.keys[0].shape[2], kv.keys[0].shape[3], kv.keys[0].dtype
        )
        long, short = times[name]
        rows.append(
            f"| {name} | {per_token / 1024:.1f} | {(1 << 30) // per_token} | {long:.1f} | "
            f"{base[0] / long:.2f}x | {short:.1f} |"
        )
    lines = [
        "### fp8 KV cache, SmolLM2-135M float32 (benchmarks/kv_fp8.py)",
        "",
        f"{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.steps} steps, fastest of {args.rounds} rounds.",
        "",
        f"| KV cache | KiB per token | tokens in 1 GiB | batch {args.batch} x {args.context} "
        "tokens: step ms | vs float32 | batch 1 x 20 tokens: step ms |",
        "|---|---|---|---|---|---|",
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
