"""Decode attention on CPU: the compiled paged kernel against gather + SDPA, as in a step.

One step's attention is a call per layer, each layer with its own K/V cache, so the K/V a
call reads comes from memory, not from the cache of the call before (as in a model, whose
weights pass through the caches between layers). Blocks are handed out in a shuffled order,
as a running server's allocator leaves them. Per dtype and batch shape: milliseconds per
step (all layers), the K/V bytes read per second and their share of the read bandwidth
measured in the same run, and the kernel's speed-up over gather + SDPA (the path the
backend takes without the compiled kernels). Fastest of `--rounds`.

    .venv/bin/python benchmarks/decode_attention.py [--rounds 3] [--layers 30]

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_limits import cpu_line, read_bandwidth  # noqa: E402

from shard import cpu_kernels  # noqa: E402
from shard.attention.reference import gather_blocks  # noqa: E402

BLOCK = 16
# (requests, keys each): batch-1 short and long, and batches at the fixed workload's contexts
CASES = ((1, 300), (1, 2000), (8, 1000), (32, 300))


class Step:
    """`layers` caches [N, BLOCK, KVH, D] and one batch's queries, tables and contexts."""

    def __init__(self, rows, ctx, heads, kv_heads, dim, layers, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        width = -(-ctx // BLOCK)
        blocks = rows * width + 1  # block 0 unused, as the server's padding block
        stored = dtype
        if dtype == torch.float8_e4m3fn:  # an fp8 cache beside bfloat16 queries
            dtype = torch.bfloat16

        def cache():
            return torch.randn(blocks, BLOCK, kv_heads, dim, generator=gen).to(stored)

        self.caches = [(cache(), cache()) for _ in range(layers)]
        order = torch.randperm(blocks - 1, generator=gen) + 1
        self.tables = order.view(rows, width)
        self.context = torch.full((rows,), ctx)
        self.q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
        self.scale = dim**-0.5
        element = torch.finfo(stored).bits // 8
        self.bytes = 2 * layers * rows * ctx * kv_heads * dim * element  # K and V read

    def kernel(self) -> None:
        for k_cache, v_cache in self.caches:
            cpu_kernels.paged_decode(
                self.q, k_cache, v_cache, self.tables, self.context, self.scale
            )

    def torch_path(self) -> None:
        """The backend's path without the kernels: blocks gathered, masked SDPA."""
        rows, heads, dim = self.q.shape
        kv_heads = self.caches[0][0].shape[2]
        flat = self.tables.flatten()
        positions = torch.arange(self.tables.shape[1] * BLOCK)
        mask = (positions < self.context.unsqueeze(1))[:, None, None, :]
        grouped = self.q.view(rows, kv_heads, heads // kv_heads, dim)
        for k_cache, v_cache in self.caches:
            keys = gather_blocks(k_cache, flat, rows).to(self.q.dtype).transpose(1, 2)
            values = gather_blocks(v_cache, flat, rows).to(self.q.dtype).transpose(1, 2)
            F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scale)


def fastest_ms(fn, rounds: int, calls: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1000


def measure(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows_out = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for rows, ctx in args.cases:
            step = Step(rows, ctx, args.heads, args.kv_heads, args.head_dim, args.layers, dtype)
            with torch.inference_mode():
                kernel = fastest_ms(step.kernel, args.rounds)
                plain = fastest_ms(step.torch_path, args.rounds)
            rows_out.append(
                {"dtype": name, "rows": rows, "keys": ctx,
                 "kernel_ms": kernel, "torch_ms": plain,
                 "gbps": step.bytes / kernel / 1e6}
            )  # fmt: skip
    return rows_out


def table(results: list[dict], bandwidth: float) -> str:
    lines = [
        "| dtype | requests x keys | kernel ms / step | K/V read GB/s (of bandwidth) "
        "| gather + SDPA ms / step | speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        share = r["gbps"] / bandwidth
        lines.append(
            f"| {r['dtype']} | {r['rows']} x {r['keys']} | {r['kernel_ms']:.2f} "
            f"| {r['gbps']:.1f} ({share:.0%}) | {r['torch_ms']:.2f} "
            f"| {r['torch_ms'] / r['kernel_ms']:.2f}x |"
        )
    return "\n".join(lines)


def parse_cases(text: str) -> tuple[tuple[int, int], ...]:
    """Cases as "1x300,32x300" -> ((1, 300), (32, 300))."""
    return tuple(tuple(int(n) for n in case.split("x")) for case in text.split(","))  # type: ignore[misc]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-135M has 30")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtypes",
        type=lambda text: text.split(","),
        default=["bfloat16", "float32"],
        help="the caches' dtypes, comma-separated; float8_e4m3fn: beside bfloat16 queries",
    )
    parser.add_argument(
        "--cases", type=parse_cases, default=CASES, help="requests x keys, comma-separated"
    )
    args = parser.parse_args(argv)
    if cpu_kernels.load() is None:
        raise SystemExit("the CPU kernels do not build here: nothing to measure")
    results = measure(args)
    bandwidth = read_bandwidth(args.threads) / 1e9
    shape = f"{args.heads} query heads over {args.kv_heads} KV heads of {args.head_dim}"
    head = (
        f"{cpu_line()}; {args.threads} threads; {shape}, {args.layers} layers; "
        f"read bandwidth {bandwidth:.1f} GB/s"
    )
    out = head + "\n\n" + table(results, bandwidth)
    print(out)
    return out


if __name__ == "__main__":
    main()
