"""SmolLM2's 120 decoder products (30 layers of qkv, o, gate_up, down; random weights of
its shapes, streamed from memory) on bfloat16 (or `--dtype float32`) rows: weights of that
dtype in our panels against int8 (per output channel) and int4 (groups of `--group`, 64)
weights, each in quant.cpp's products on the row-major codes and in our quantized panels
(issue 16), the panels' scales and mins float16 (the weights are bfloat16 values, so every
min is a float16 value) and, as a form of its own, the same values in float32. The forms
take turns within each of `--rounds` rounds; each keeps its median.

    .venv/bin/python benchmarks/qpanel_products.py [--dtype float32] [--rounds 7] [--rows 8]
        [--group 32]

Needs AVX-512 with bf16 dot products. Run with nothing else on the machine.
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

from shard import cpu_kernels  # noqa: E402
from shard.models.qpanels import int4_panels, int8_panels  # noqa: E402
from shard.models.quant import quantize_int4, quantize_int8, unpack_int4  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # (out, in)
FORMS = ["plain panels", "int8 codes", "int8 panels", "int8 panels (dot products)",
         "int8 panels (multiply-adds)", "int4 codes", "int4 panels", "int4 panels (dot products)",
         "int4 panels, float32 parameters"]  # fmt: skip
# "(dot products)": qpanel_linear(tiles=False), the bf16 dot products where AMX tiles would
# take 13 rows or more (the same as "panels" on a CPU without them), and up to 4 bfloat16
# rows by bf16 dot products where the CPU would take float32 multiply-adds; "(multiply-adds)":
# up to 4 bfloat16 rows by float32 multiply-adds wherever (qpanel_linear(paired=True))


def layers(kernels, dtype: torch.dtype, group: int) -> list[dict]:
    torch.manual_seed(0)
    made = []
    for n, k in SHAPES:
        w = torch.randn(n, k).bfloat16().float()  # a bfloat16 model's weights
        q8, s8 = quantize_int8(w)
        q4, s4, m4 = quantize_int4(w, group)
        i4 = int4_panels(unpack_int4(q4), s4, m4)
        assert i4[1].dtype == torch.float16
        made.append({
            "n": n, "k": k, "plain panels": (kernels.pack_panels(w.to(dtype)),),
            "int8 codes": (q8, s8), "int8 panels": (*int8_panels(q8, s8), None),
            "int4 codes": (q4, s4, m4), "int4 panels": i4,
            "int4 panels, float32 parameters": (i4[0], i4[1].float(), i4[2].float()),
        })  # fmt: skip
    return made


def run(kernels, made: list[dict], form: str, rows: int, dtype: torch.dtype) -> float:
    """ms for the 120 products of `rows` rows of `dtype` in `form`."""
    xs = {k: torch.randn(rows, k).to(dtype) for k in (576, 1536)}
    call = {
        "plain panels": lambda x, a, n: kernels.panel_linear(x, *a, n),
        "int8 codes": lambda x, a, n: kernels.q8_linear(x, *a),
        "int8 panels": lambda x, a, n: kernels.qpanel_linear(x, *a, n),
        "int8 panels (dot products)": lambda x, a, n: kernels.qpanel_linear(
            x, *a, n, tiles=False, paired=False
        ),
        "int8 panels (multiply-adds)": lambda x, a, n: kernels.qpanel_linear(x, *a, n, paired=True),
        "int4 codes": lambda x, a, n: kernels.q4_linear(x, *a),
        "int4 panels": lambda x, a, n: kernels.qpanel_linear(x, *a, n),
        "int4 panels (dot products)": lambda x, a, n: kernels.qpanel_linear(x, *a, n, tiles=False),
        "int4 panels, float32 parameters": lambda x, a, n: kernels.qpanel_linear(x, *a, n),
    }[form]
    start = time.perf_counter()
    for layer in made:
        call(xs[layer["k"]], layer[form.split(" (")[0]], layer["n"])
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--group", type=int, default=64, help="int4's group size")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    kernels = cpu_kernels.load()
    if not hasattr(kernels, "qpanel_linear"):
        sys.exit("this CPU's build has no quantized panels (AVX-512 with bf16 dot products)")
    made = layers(kernels, dtype, args.group)
    print(f"{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.dtype} rows, int4 groups of {args.group}; few-row int8 by "
          f"{'multiply-adds' if kernels.qpanel_paired() else 'dot products'} here; "
          f"median ms of {args.rounds} rounds, forms alternating\n")  # fmt: skip
    print("| rows | " + " | ".join(FORMS) + " |")
    print("|---:|" + "---:|" * len(FORMS))
    for rows in args.rows or [1, 8, 32, 128]:
        times: dict[str, list[float]] = {form: [] for form in FORMS}
        for _ in range(args.rounds):
            for form in FORMS:
                times[form].append(run(kernels, made, form, rows, dtype))
        cells = " | ".join(f"{statistics.median(times[f]):.2f}" for f in FORMS)
        print(f"| {rows} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
