"""The quantized layers' kernels alone on a GPU, at Llama-3.2-1B's layer shapes: microseconds
and weight bytes per second for bf16 (cuBLAS), int8 and int4 (groups of 32) through
shard/models/quant_triton.py, fp8 (torch._scaled_mm after the activations' quantization,
one Triton launch or the torch form), at a decode step's rows (up to quant_triton.GEMV_ROWS
the CUDA-core kernels, beyond them tl.dot's); then, at one row, the int8 / int4 CUDA-core
kernels under other tile shapes, depths, splits of K and roundings (which to choose next).

Each time is one CUDA-graph replay of 64 calls over rotating copies of the weights (256 MB
of them, or 64 copies: the 60 MB L2 never holds the next call's weights), divided by 64.

    python benchmarks/gpu_quant_kernels.py [--rows 1,2,4,8,64]
    python benchmarks/gpu_quant_kernels.py --device cpu --small   # a smoke test (interpreter)
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import triton

from shard.kv_cache import FP8_MAX
from shard.models import fp8, quant
from shard.models import quant_triton as qt

SHAPES = {  # name -> (N outputs, K inputs)
    "qkv": (3072, 2048),
    "o": (2048, 2048),
    "gate_up": (16384, 2048),
    "down": (2048, 8192),
    "head": (128256, 2048),
}
SMALL = {"qkv": (96, 128), "down": (64, 256)}
CALLS = 64  # per replay
# At one row, the CUDA-core (GEMV) kernels' (BLOCK_N, BLOCK_K, programs per SM before K is
# split (None: no split), warps, stages, weights rounded to x's dtype first, KEEP (int8 per
# channel: sums kept per input until the end; int4 ignores it))
VARIANTS = [
    (8, 2048, 8, 4, 3, False, False),  # quant_triton.GEMV_WIDE (int4; int8 up to 4096 x 4096)
    (8, 256, 8, 1, 3, False, True),  # quant_triton.GEMV_NARROW (larger int8 layers, KEEP)
    (8, 1024, 8, 4, 3, False, True),
    (8, 512, 8, 1, 3, False, True),
    (4, 256, 8, 1, 3, False, True),
    (8, 256, 8, 2, 3, False, True),
    (8, 256, 16, 1, 3, False, True),
    (16, 256, 8, 1, 3, False, True),
    (8, 512, 8, 2, 3, False, False),
    (4, 1024, 8, 2, 3, False, False),
    (8, 2048, 16, 4, 3, False, False),
    (8, 4096, 8, 8, 3, False, False),
    (8, 256, 8, 1, 3, True, False),
]


def timed(calls, device: str) -> float:
    """Microseconds per call of `calls` (a list of CALLS closures)."""
    if device != "cuda":  # the smoke test: two calls
        start = time.perf_counter()
        for call in calls[:2]:
            call()
        return (time.perf_counter() - start) / 2 * 1e6
    for call in calls[:3]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return sorted(times)[len(times) // 2]


def rotation(w, device: str) -> list:
    """Distinct copies of w (a tensor or a tuple of them), 256 MB or CALLS of them."""
    count = min(CALLS, max(1, (256 << 20) // nbytes(w))) if device == "cuda" else 1

    def copy(t):
        return t.clone() if t is not None else None

    return [w] + [
        tuple(map(copy, w)) if isinstance(w, tuple) else copy(w) for _ in range(count - 1)
    ]


def weights(n: int, k: int, device: str) -> dict:
    """One draw of each format's weights [N, K]."""
    w = torch.randn(n, k, device=device) * 0.02
    q8, s8 = quant.quantize_int8(w)
    packed, s4, m4 = quant.quantize_int4(w, 32)
    f8, f8_scales = fp8.quantize_rows(w) if device == "cuda" else (None, None)
    return {"bf16": w.bfloat16(), "int8": (q8, s8), "int4": (packed, s4, m4),
            "fp8": (f8, None if f8_scales is None else f8_scales.view(1, -1))}  # fmt: skip


def forms(x: torch.Tensor) -> dict:
    """format -> (weights -> output) at the serving defaults."""

    def fp8_with(rows_fn):
        def run(w):
            q, scales = rows_fn(x)
            return torch._scaled_mm(q, w[0].t(), scale_a=scales, scale_b=w[1],
                                    out_dtype=torch.bfloat16)  # fmt: skip

        return run

    table = {
        "bf16": lambda w: x @ w.T,
        # bf16 weights through the int8 kernel with scales of 1: a split-K Triton GEMV
        "bf16 (Triton)": lambda w: qt.q8_linear(x, w, ones(w)),
        "int8": lambda w: qt.q8_linear(x, *w),
        "int4 g32": lambda w: qt.q4_linear(x, *w),
    }
    if x.is_cuda:
        table["fp8 (1 launch)"] = fp8_with(lambda v: qt.fp8_rows(v, FP8_MAX, fp8._TINY))
        table["fp8 (torch form)"] = fp8_with(fp8.quantize_rows)
    return table


def ones(w: torch.Tensor) -> torch.Tensor:
    """Float16 scales of 1, one per output row of w."""
    return torch.ones(w.shape[0], 1, dtype=torch.float16, device=w.device)


def nbytes(w) -> int:
    parts = w if isinstance(w, tuple) else (w,)
    return sum(p.numel() * p.element_size() for p in parts if p is not None)


def variant_call(kind: str, x: torch.Tensor, w, variant) -> callable:
    """The int8 / int4 GEMV kernel at one row under `variant`'s tiles."""
    block_n, block_k, per_sm, warps, stages, rounded, keep = variant
    n = w[0].shape[0]
    k = w[0].shape[1] * (2 if kind == "int4" else 1)
    groups = w[1].shape[1]
    c = {**qt.constants(kind, 1, k, groups, x.dtype), "BLOCK_N": block_n, "BLOCK_K": block_k,
         "ROUND": rounded, "KEEP": keep and groups == 1 and not rounded}  # fmt: skip
    programs = triton.cdiv(n, block_n)
    sms = qt._multiprocessors(x.device)
    steps = triton.cdiv(k, block_k)
    split = 1 if per_sm is None else max(1, min(steps, per_sm * sms // programs))
    per = triton.cdiv(steps, split) * block_k
    split = triton.cdiv(k, per)
    kernel = qt.kernel_for(kind, c)

    def run():
        out = x.new_empty(1, n)
        target = out if split == 1 else x.new_empty(split, 1, n, dtype=torch.float32)
        kernel[(programs, split)](x, *w, target, 1, n, k, k, n, per, **c,
                                  num_warps=warps, num_stages=stages)  # fmt: skip
        if split > 1:
            qt._sum_splits_kernel[(triton.cdiv(n, 1024),)](target, out, n, SPLIT=split,
                                                           BLOCK=1024)  # fmt: skip
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,64")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    args = parser.parse_args()
    shapes = SMALL if args.small else SHAPES
    rows_list = [int(r) for r in args.rows.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"quantized kernels on {name}: us per call (weight GB/s), 1B layer shapes")
    drawn = {s: weights(n, k, args.device) for s, (n, k) in shapes.items()}
    header = None
    for rows in rows_list:
        for shape, (n, k) in shapes.items():
            x = torch.randn(rows, k, device=args.device).bfloat16()
            table = forms(x)
            if header is None:
                header = list(table)
                print("| rows | layer | " + " | ".join(header) + " |")
                print("|---:|---|" + "---:|" * len(header))
            cells = []
            for form, fn in table.items():
                w = drawn[shape][form.split(" ")[0]]  # "bf16 (Triton)": bf16's
                copies = rotation(w, args.device)
                calls = [functools.partial(fn, copies[i % len(copies)]) for i in range(CALLS)]
                us = timed(calls, args.device)
                cells.append(f"{us:.1f} ({nbytes(w) / us / 1e3:.0f})")
                del copies, calls
            print(f"| {rows} | {shape} [{n}x{k}] | " + " | ".join(cells) + " |", flush=True)
    x1 = {s: torch.randn(1, k, device=args.device).bfloat16() for s, (n, k) in shapes.items()}
    print("\none row, int8 / int4 g32 GEMV kernels by (BLOCK_N, BLOCK_K, programs per SM "
          "before K is split, warps, stages, rounded, kept): us per call")  # fmt: skip
    print("| variant | " + " | ".join(f"{s} int8 | {s} int4" for s in shapes) + " |")
    print("|---|" + "---:|" * (2 * len(shapes)))
    for variant in VARIANTS:
        cells = []
        for shape in shapes:
            for kind in ("int8", "int4"):
                w, x = drawn[shape][kind], x1[shape]
                expected = (qt.q8_linear(x, *w) if kind == "int8" else qt.q4_linear(x, *w)).float()
                got = variant_call(kind, x, w, variant)().float()
                if (got - expected).norm() > 1e-2 * expected.norm():
                    cells.append("wrong")  # not the default kernel's product: not timed
                    continue
                copies = rotation(w, args.device)
                calls = [variant_call(kind, x, copies[i % len(copies)], variant)
                         for i in range(CALLS)]  # fmt: skip
                cells.append(f"{timed(calls, args.device):.1f}")
                del copies, calls
        print(f"| {variant} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
