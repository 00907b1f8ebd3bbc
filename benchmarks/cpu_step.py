"""Decode step of SmolLM2-135M with the one-call C++ step (shard/models/cpu_step.py) and
without it (the Python forward over the same kernels), per weight form, in one process: at
batch 1, and at batch 8 where the step takes several rows (quantized weights).

The two take turns over `--rounds` rounds (shared machines drift between minutes) and each
keeps its fastest median; the greedy tokens of both are checked equal on the way.

    .venv/bin/python benchmarks/cpu_step.py [--steps 30] [--rounds 3]

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
from quant_step import CONFIGS, decode_ms  # noqa: E402

from tests.helpers import make_engine, run_to_end, spec  # noqa: E402

PROMPT = " ".join(str(i) for i in range(20))


def tokens(engine) -> list[int]:
    return run_to_end(engine, 99, [spec(0, PROMPT, 16, ignore_eos=True)]).tokens[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from shard.embedded import default_model_dir

    rows = []
    for name, options in CONFIGS.items():
        engine = make_engine(default_model_dir(), kv_bytes=256 << 20, **options)
        runner = engine.runner
        step = runner.cpu_step
        assert step is not None, runner.cpu_step_reason
        batches = (1, 8) if step.max_rows >= 8 else (1,)
        best = {(how, b): float("inf") for how in ("C++", "Python") for b in batches}
        same = []
        for _ in range(args.rounds):
            for how, value in (("C++", step), ("Python", None)):
                runner.cpu_step = value
                for batch in batches:
                    specs = [spec(i, PROMPT, args.steps + 4, ignore_eos=True) for i in range(batch)]
                    ms = decode_ms(engine, specs, args.steps)
                    best[how, batch] = min(best[how, batch], ms)
            runner.cpu_step = step
            fused = tokens(engine)
            runner.cpu_step = None
            same.append(fused == tokens(engine))
            runner.cpu_step = step
        cells = []
        for batch in (1, 8):
            if batch in batches:
                fused, python = best["C++", batch], best["Python", batch]
                cells.append(f"{fused:.1f} | {python:.1f} | {python / fused:.2f}x")
            else:
                cells.append("- | - | not fused (oneDNN past 1 row)")
        rows.append(f"| {name} | {' | '.join(cells)} | {all(same)} |")
        print(rows[-1], flush=True)
    print(f"\n{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| weights | batch 1: C++ step ms | Python forward ms | speed-up "
        "| batch 8: C++ step ms | Python forward ms | speed-up | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
