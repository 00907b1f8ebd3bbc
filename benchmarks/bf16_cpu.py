"""bfloat16 against float32 on a CPU without bf16 instructions, SmolLM2-135M, in one process.

Three configurations take turns over `--rounds` rounds (each keeps its fastest figure):
float32; bfloat16 as the shard serves it there (AVX2: the layers widen their weights to
float32 for products of several rows, `Linear.widen`, shard/models/linear.py; AVX-512 F and
BW: our bfloat16 panels, widened to float32 in registers, shard/csrc/panels.cpp); and
bfloat16 with unpacked layers and that widening off, so several rows go through oneDNN's
bfloat16 path (what every bfloat16 product of several rows took before; on AVX-512 the
layers had oneDNN's packed weights). Per configuration: the median decode step of 1, 8 and 32
requests, and a prefill of 128 and of 512 tokens (one request). The figures are ratios
to float32 in the same run.

    .venv/bin/python benchmarks/bf16_cpu.py [--steps 20] [--rounds 3]

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_limits import cpu_line  # noqa: E402
from quant_step import step_ms  # noqa: E402

from shard.models.linear import Linear  # noqa: E402
from tests.helpers import make_engine, spec  # noqa: E402

CONFIGS = ("float32", "bfloat16", "bfloat16 through oneDNN")
BATCHES = (1, 8, 32)
PROMPTS = (128, 512)


def set_widen(engine, on: bool) -> None:
    """Every Linear of the model widens its bfloat16 weights (on) or leaves several rows to
    oneDNN (off)."""
    model = engine.runner.model
    layers = [model.lm_head.linear]
    for layer in model.layers:
        layers += [layer.qkv, layer.o_proj, layer.mlp.gate_up, layer.mlp.down]
    for layer in layers:
        layer = getattr(layer, "linear", layer)  # RowParallel holds its Linear
        assert isinstance(layer, Linear) and layer.plain is not None and not layer.is_packed
        layer.widen = on


def prefill_ms(engine, tokens: int) -> float:
    ids = [(100 + 7 * t) % 40000 + 100 for t in range(tokens)]
    start = time.perf_counter()
    engine.prefill(1, [spec(0, "", 2, ignore_eos=True, input_ids=ids)], None)
    took = (time.perf_counter() - start) * 1000
    engine.clear(None)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from shard import cpu_kernels
    from shard.embedded import default_model_dir

    if cpu_kernels.has_bf16_instructions():
        sys.exit("this CPU has bf16 instructions: bfloat16 takes oneDNN's native path here")
    model_dir = default_model_dir()
    make = lambda dtype, **kw: make_engine(  # noqa: E731
        model_dir, kv_bytes=256 << 20, max_total=1024, dtype=dtype, **kw
    )
    engines = {"float32": make("float32"), "bfloat16": make("bfloat16")}
    engines[CONFIGS[2]] = make("bfloat16", pack_linear=False)
    set_widen(engines[CONFIGS[2]], False)
    for name, engine in engines.items():
        print(f"{name}: {engine.runner.kernel_report()}")
    best: dict[tuple[str, str], float] = {}
    for round_ in range(args.rounds):
        for name in CONFIGS:
            engine = engines[name]
            figures = {f"batch {b}": step_ms(engine, b, args.steps) for b in BATCHES}
            figures |= {f"prefill {n}": prefill_ms(engine, n) for n in PROMPTS}
            for key, ms in figures.items():
                best[name, key] = min(best.get((name, key), float("inf")), ms)
            shown = ", ".join(f"{key} {ms:.1f}" for key, ms in figures.items())
            print(f"round {round_ + 1}: {name}: {shown} ms", flush=True)
    keys = [f"batch {b}" for b in BATCHES] + [f"prefill {n}" for n in PROMPTS]
    print(f"\n{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| weights | " + " | ".join(f"{k} ms (vs float32)" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name in CONFIGS:
        cells = []
        for key in keys:
            ms, base = best[name, key], best["float32", key]
            cells.append(f"{ms:.1f}" if name == "float32" else f"{ms:.1f} ({ms / base:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
