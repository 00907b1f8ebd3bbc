"""Decode step on a GPU, in one process: pytgi eager, pytgi with CUDA graphs, pytgi with CUDA
graphs but the layer's element-wise steps as torch ops instead of the fused kernels
(shard/models/fused.py), transformers, against the HBM bound (weight bytes / measured copy
bandwidth).

Mean milliseconds per `engine.decode` call (forward, sampling, detokenization) over
`--steps` steps after a 128-token prompt; transformers: `generate` with a static batch of the
same prompts (per-token time of `max_new_tokens=steps+1` minus a 1-token run).

    python benchmarks/gpu_decode.py MODEL_DIR [--batch 1,8,64] [--json out.json]

With `--quantized`: the CUDA-graph step of the same model with bf16 weights, fp8 weights
(`--quantize fp8`), int8 and int4 (groups of 32) weights, and bf16 weights over an fp8 KV
cache, each against its own weights' HBM bound (a table in the log; no JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from common.config import ShardConfig
from shard.batch import RequestSpec
from shard.engine import ShardEngine
from shard.models.ops import LayerOps, TorchOps
from shard.sampling import SamplingParams


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str, size: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy, read + write (median of 10 copies)."""
    a = torch.ones(size, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        sync()
        start = time.perf_counter()
        b.copy_(a)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * a.numel() / statistics.median(times[2:])


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(100, min(vocab, 49152) - 100, (batch, length), generator=gen).tolist()


def ours(engine: ShardEngine, batch: list[list[int]], steps: int) -> float:
    specs = [
        RequestSpec(id=i, inputs="", input_ids=p, sampling=SamplingParams(),
                    max_new_tokens=steps + 8, ignore_eos=True)
        for i, p in enumerate(batch)
    ]  # fmt: skip
    engine.prefill(1, specs, None)
    for _ in range(3):
        engine.decode([1])
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode([1])
    sync()
    elapsed = (time.perf_counter() - start) / steps
    engine.clear(None)
    return elapsed * 1000


def theirs(model, batch: list[list[int]], steps: int) -> float:
    ids = torch.tensor(batch, device=model.device)

    def run(new: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)  # fmt: skip
        sync()
        return time.perf_counter() - start

    run(2)
    return (run(steps + 1) - run(1)) / steps * 1000


def engine_for(
    model_dir: Path,
    graphs: tuple[int, ...],
    device: str,
    ops: LayerOps | None = None,
    **options,
) -> ShardEngine:
    """On CUDA: Triton attention, graphs of the given sizes. On CPU (a smoke test of this
    script): the reference backend, graphs through EagerGraph. `ops`: the model's
    element-wise ops, when not its device's default (set before the graphs are captured);
    `options`: more ShardConfig fields (quantize, kv_cache_dtype)."""
    config = ShardConfig(model_dir=str(model_dir), device=device, cuda_graphs=graphs,
                         attention="triton" if device == "cuda" else "reference",
                         cuda_memory_fraction=0.3, kv_cache_memory=256 << 20,
                         **options)  # fmt: skip
    engine = ShardEngine(config)
    if ops is not None:
        engine.runner.model.ops = ops
    engine.warmup([], None, 2048, 1024)
    return engine


def release(engine: ShardEngine) -> None:
    engine.runner.free_kv()
    release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


QUANTIZED = {
    "bf16": {},
    "fp8 weights": {"quantize": "fp8"},
    "int8 weights": {"quantize": "int8"},
    "int4 weights (g32)": {"quantize": "int4", "quantize_group_size": 32},
    "bf16, fp8 KV cache": {"kv_cache_dtype": "fp8_e4m3fn"},
}


def quantized_table(args, sizes: list[int], bandwidth: float, vocab: int) -> list[str]:
    """The CUDA-graph step per weight / KV format; a format this device refuses is a row
    saying why."""
    from shard.errors import ModelLoadError

    graph_sizes = tuple(sorted({1, 2, 4, 8, 16, 32, 64, *sizes}))
    head = " | ".join(f"batch {b} ms" for b in sizes)
    lines = [f"| format | weights GiB | {head} | batch {sizes[0]} / its bound |",
             "|---|---:|" + "---:|" * (len(sizes) + 1)]  # fmt: skip
    for name, options in QUANTIZED.items():
        try:
            engine = engine_for(args.model_dir, graph_sizes, args.device, **options)
        except ModelLoadError as exc:
            lines.append(f"| {name} | refused: {exc} |")
            continue
        weight_bytes = engine.runner.model.weight_bytes
        times = [ours(engine, prompts(b, 128, vocab), args.steps) for b in sizes]
        bound = weight_bytes / bandwidth * 1000
        cells = " | ".join(f"{t:.3f}" for t in times)
        lines.append(f"| {name} | {weight_bytes / 2**30:.2f} | {cells} | {times[0] / bound:.2f}x |")
        print(lines[-1], flush=True)
        release(engine)
        del engine
        release_memory()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--batch", default="1,8,64")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script")
    parser.add_argument("--quantized", action="store_true", help="the formats' table only")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch.split(",")]
    bandwidth = copy_bandwidth(args.device, 1 << 30 if args.device == "cuda" else 64 << 20)
    if args.quantized:
        from shard.spec import read_spec

        vocab = read_spec(str(args.model_dir)).vocab_size
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"{args.model_dir.name} on {name}: weight and KV formats, CUDA graphs, "
              f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")  # fmt: skip
        print("\n".join(quantized_table(args, sizes, bandwidth, vocab)))
        return
    rows: dict[int, dict] = {b: {} for b in sizes}
    eager = engine_for(args.model_dir, (), args.device)
    weight_bytes = eager.runner.model.weight_bytes  # every tensor the shard loaded, once
    vocab = eager.model_spec.vocab_size
    for b in sizes:
        rows[b]["eager_ms"] = ours(eager, prompts(b, 128, vocab), args.steps)
    release(eager)
    del eager
    release_memory()
    graph_sizes = tuple(sorted({1, 2, 4, 8, 16, 32, 64, *sizes}))
    for column, ops in [("graphs_ms", None), ("torch_ops_ms", TorchOps())]:
        graphed = engine_for(args.model_dir, graph_sizes, args.device, ops)
        for b in sizes:
            rows[b][column] = ours(graphed, prompts(b, 128, vocab), args.steps)
        release(graphed)
        del graphed  # its weights go before the next copy arrives
        release_memory()
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
        hf = hf.to(args.device).eval()
        for b in sizes:
            rows[b]["transformers_ms"] = theirs(hf, prompts(b, 128, vocab), args.steps)
        del hf
    bound_ms = weight_bytes / bandwidth * 1000  # weights read once per step at copy speed
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [
        f"{args.model_dir.name} on {name}: weights {weight_bytes / 2**30:.2f} GiB, copy "
        f"bandwidth {bandwidth / 1e12:.2f} TB/s (read+write), HBM bound {bound_ms:.3f} ms/step",
        "",
        "| batch | pytgi eager ms | pytgi CUDA graphs ms | graphs, torch ops ms | transformers ms "
        "| graphs / bound |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b in sizes:
        r = rows[b]
        hf_ms = f"{r['transformers_ms']:.3f}" if "transformers_ms" in r else "-"
        lines.append(
            f"| {b} | {r['eager_ms']:.3f} | {r['graphs_ms']:.3f} | {r['torch_ops_ms']:.3f} | {hf_ms} | "
            f"{r['graphs_ms'] / bound_ms:.2f}x |"
        )
    print("\n".join(lines))
    if args.json:
        report = {"model": args.model_dir.name, "device": name, "bandwidth": bandwidth,
                  "weight_bytes": weight_bytes, "bound_ms": bound_ms, "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
