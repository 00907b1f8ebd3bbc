"""Served throughput of one model in several weight formats, through `pytgi-launcher`
(streamed, TGI's API, EOS ignored): the fixed workload (128 in / 128 out) at concurrency 1
(4 requests) and 32 (32 requests), per format: float32, bfloat16, int8, int4 (issues 16, 20).

    .venv/bin/python benchmarks/served_formats.py [--model-id DIR] [--format int8 ...]

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_limits import cpu_line  # noqa: E402
from launched import launcher  # noqa: E402
from loadgen import run_load, summarize  # noqa: E402
from workloads import WORKLOADS, single_token_words  # noqa: E402

FORMATS = {
    "float32": [],
    "bfloat16": ["--dtype", "bfloat16"],  # the later --dtype wins
    "int8": ["--quantize", "int8"],
    "int4": ["--quantize", "int4"],
    "int8, bfloat16 activations": ["--dtype", "bfloat16", "--quantize", "int8"],
    "int4, bfloat16 activations": ["--dtype", "bfloat16", "--quantize", "int4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", type=Path, default=None, help="default: SmolLM2")
    parser.add_argument("--format", action="append", choices=sorted(FORMATS))
    parser.add_argument("--port", type=int, default=3021)
    args = parser.parse_args()
    from shard.embedded import default_model_dir

    model_dir = args.model_id or default_model_dir()
    words = single_token_words(model_dir)
    flags = ["--model-id", str(model_dir), "--dtype", "float32", "--max-total-tokens", "1024",
             "--max-input-tokens", "768", "--max-batch-prefill-tokens", "512",
             "--kv-cache-memory", "2GiB"]  # fmt: skip
    rows = []
    for name in args.format or list(FORMATS):
        with launcher(args.port, *flags, *FORMATS[name]) as server:
            cells = []
            for concurrency, count in ((1, 4), (32, 32)):
                requests = WORKLOADS["fixed"](count, words=words, prompt=128, new=128)
                results, seconds = asyncio.run(
                    run_load(server.url, "tgi", requests, concurrency, None, 3600)
                )
                s = summarize(results, seconds, name)
                cells.append(f"{s['output_token_throughput']:.1f}")
                cells.append(f"{s['tpot_s']['median'] * 1000:.1f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    print(f"\n{cpu_line()}\n")
    print("| weights | c=1 tok/s | c=1 TPOT p50 ms | c=32 tok/s | c=32 TPOT p50 ms |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
