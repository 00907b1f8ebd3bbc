"""Served throughput and TPOT with the shards' step ahead (`--step-ahead`) and without it
(or another on/off launcher setting, `--flag huge-pages`), on any device: `pytgi-launcher`
started once per setting and round, the settings taking turns (a shared machine drifts
within minutes), each keeping its best round.

The fixed workload (`--prompt` / `--new` tokens, EOS ignored, prefix cache off), streamed
through TGI's API by the load generator at each `--concurrency`.

    .venv/bin/python benchmarks/step_ahead.py [--model-id DIR] [--dtype bfloat16]
        [--concurrency 1 --concurrency 8] [--rounds 2] [--launcher-arg=--cuda-memory-fraction ...]
        [--flag huge-pages]

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


def settings(flag: str) -> tuple[str, str]:
    """The launcher's (off, on) flags of an on/off setting."""
    return f"--no-{flag}", f"--{flag}"


def measure(model_dir: Path, args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    """(setting, concurrency) -> the load generator's summary of its best round (most tok/s)."""
    words = single_token_words(model_dir)
    flags = ["--model-id", str(model_dir), "--dtype", args.dtype, "--no-prefix-caching",
             "--max-total-tokens", str(args.prompt + args.new + 8),
             "--max-input-tokens", str(args.prompt + 4), *args.launcher_arg]  # fmt: skip
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for setting in settings(args.flag):
            with launcher(args.port, *flags, setting) as server:
                for concurrency in args.concurrency:
                    requests = WORKLOADS["fixed"](
                        max(2, concurrency * args.requests_per_client),
                        words=words, prompt=args.prompt, new=args.new,
                    )  # fmt: skip
                    results, seconds = asyncio.run(
                        run_load(server.url, "tgi", requests, concurrency, None, 3600)
                    )
                    summary = summarize(results, seconds, setting)
                    if sum(summary["failures"].values()):
                        sys.exit(f"{setting} c={concurrency}: failures {summary['failures']}")
                    key = (setting, concurrency)
                    rate = summary["output_token_throughput"]
                    if key not in best or rate > best[key]["output_token_throughput"]:
                        best[key] = summary
    return best


def table(best: dict[tuple[str, int], dict], concurrencies: list[int], flag: str) -> str:
    lines = [
        "| concurrency | tok/s off | tok/s on | on / off | TPOT p50 off | TPOT p50 on |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrencies:
        off, on = (best[setting, c] for setting in settings(flag))
        rate_off, rate_on = off["output_token_throughput"], on["output_token_throughput"]
        lines.append(
            f"| {c} | {rate_off:.1f} | {rate_on:.1f} | {rate_on / rate_off:.3f} | "
            f"{off['tpot_s']['median'] * 1e3:.2f} ms | {on['tpot_s']['median'] * 1e3:.2f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    from shard.embedded import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", type=Path, default=None, help="default: SmolLM2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=3023)
    parser.add_argument("--launcher-arg", action="append", default=[], help="extra launcher flag")
    parser.add_argument(
        "--flag", default="step-ahead", help="the on/off launcher setting compared (--X/--no-X)"
    )
    args = parser.parse_args()
    args.concurrency = args.concurrency or [1, 8]
    model_dir = args.model_id or default_model_dir()
    best = measure(model_dir, args)
    import torch

    gpu = f"{torch.cuda.get_device_name()}; " if torch.cuda.is_available() else ""
    print(f"{gpu}{cpu_line()}; {model_dir.name}, {args.dtype}; fixed {args.prompt} in / {args.new} "
          f"out; --{args.flag} on and off, best of {args.rounds} rounds, settings "
          "alternating")  # fmt: skip
    print()
    print(table(best, args.concurrency, args.flag))


if __name__ == "__main__":
    main()
