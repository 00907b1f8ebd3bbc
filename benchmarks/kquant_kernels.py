"""Batch-1 products of SmolLM2's 120 decoder layers in each packed form the CPU kernels
take, GGUF's K-quant forms next to the ones they join (issue 16).

Random weights of SmolLM2-135M's shapes (30 layers of q/k/v 960 x 576, o 576 x 576,
gate/up 3072 x 576, down 576 x 1536), one input row: per form the fastest and the median of
`--rounds` passes over all 120 layers, the forms taking turns, and the weights per second.
Float32 scales are what Q4_K (d s, a float16 times a 6-bit integer) and Q6_K (d s, times an
int8) become; Q6_K's groups are 16 inputs.

    .venv/bin/python benchmarks/kquant_kernels.py [--rounds 12]

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_limits import cpu_line  # noqa: E402

from shard.models.quant import QuantLinear, quantize_int4, quantize_int8  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # [out, in] per layer


def _int4(weight: torch.Tensor, wide: bool) -> QuantLinear:
    packed, scales, mins = quantize_int4(weight, 32)
    return QuantLinear("int4", packed, (scales.float() if wide else scales, mins))


def _int8(weight: torch.Tensor, group: int | None, wide: bool) -> QuantLinear:
    q, scales = quantize_int8(weight, group)
    return QuantLinear("int8", q, (scales.float() if wide else scales,))


FORMS = {
    "int4 groups of 32, float16 scales (Q4_0/Q4_1)": lambda w: _int4(w, False),
    "int4 groups of 32, float32 scales (Q4_K)": lambda w: _int4(w, True),
    "int8 per output channel (--quantize int8)": lambda w: _int8(w, None, False),
    "int8 groups of 32, float16 scales (Q8_0)": lambda w: _int8(w, 32, False),
    "int8 groups of 16, float32 scales (Q6_K)": lambda w: _int8(w, 16, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    layers = {
        name: [make(torch.randn(*shape, generator=gen)) for shape in SHAPES]
        for name, make in FORMS.items()
    }
    inputs = {k: torch.randn(1, k, generator=gen) for k in (576, 1536)}
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    for _ in range(args.rounds):
        for name, forms in layers.items():
            start = time.perf_counter()
            for (_, k), layer in zip(SHAPES, forms, strict=True):
                layer(inputs[k])
            times[name].append(time.perf_counter() - start)
    weights = sum(n * k for n, k in SHAPES)
    print(f"{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| form | fastest ms | median ms | G weights/s |")
    print("|---|---|---|---|")
    for name, spent in times.items():
        best = min(spent)
        print(
            f"| {name} | {best * 1e3:.2f} | {statistics.median(spent) * 1e3:.2f} | "
            f"{weights / best / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
