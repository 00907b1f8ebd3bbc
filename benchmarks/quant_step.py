"""Decode step of SmolLM2-135M with quantized weights next to float32 and bfloat16 (issue 16).

Per configuration, a ShardEngine on the embedded model (CPU): the median decode step of a
batch of 1 and of 32 requests (20-number prompts), the bytes a step streams (the decoder's
weights and the LM head, packed forms with their scales), the read rate that implies
against the machine's read bandwidth measured in the same run (`cpu_limits.read_bandwidth`),
and the peak resident memory of a fresh process loading it.
Shared virtual machines drift by tens of percent between minutes, so the configurations
take turns over `--rounds` rounds and each keeps its fastest median.

    .venv/bin/python benchmarks/quant_step.py [--steps 30] [--rounds 3] [--codes] [--append]

`--codes` adds the bfloat16-activation forms with `--no-pack-linear`: their codes row-major
through quant.cpp's products instead of our quantized panels (qpanels.cpp), same run.

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_limits import cpu_line, read_bandwidth  # noqa: E402

from shard.models.linear import Linear  # noqa: E402
from tests.helpers import make_engine, spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CONFIGS = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "int8 (float32 activations)": dict(dtype="float32", quantize="int8"),
    "int4 groups of 32 (the GGUF's Q4_1 blocks)": dict(
        dtype="float32", quantize="int4", quantize_group_size=32
    ),
    "int4 groups of 64": dict(dtype="float32", quantize="int4", quantize_group_size=64),
    # served with --dtype bfloat16: bf16 dot products of the codes where the CPU has them
    "int8 (bfloat16 activations)": dict(dtype="bfloat16", quantize="int8"),
    "int4 groups of 32 (bfloat16 activations)": dict(
        dtype="bfloat16", quantize="int4", quantize_group_size=32
    ),
    "int4 groups of 64 (bfloat16 activations)": dict(
        dtype="bfloat16", quantize="int4", quantize_group_size=64
    ),
}


def streamed_bytes(engine) -> int:
    """Bytes a decode step reads: every weight loaded but the embedding table (a lookup
    reads one row of it), plus a tied plain LM head's own (the loader counted the table once,
    as the embedding): its panels, a packed copy of the table, else the table. (Until
    2026-11-30 a bfloat16 head's panels were left out: its rows read 212 MB, not 269.)"""
    model = engine.runner.model
    table, head = model.embed.weight, model.lm_head.linear
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    streamed = model.weight_bytes - size(table)
    if isinstance(head, Linear) and model.spec.tie_word_embeddings:
        streamed += size(head.panels) if head.panels is not None else size(table)
    return streamed


def peak_rss_mb(options: dict) -> float:
    """Peak resident memory (VmHWM) of a fresh process that loads the engine and warms it up
    with a 64 MiB KV cache, as a shard does at start."""
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.helpers import make_engine; from shard.embedded import default_model_dir;"
        f"make_engine(default_model_dir(), kv_bytes=64 << 20, **{options!r});"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def step_ms(engine, batch: int, steps: int) -> float:
    prompt = " ".join(str(i) for i in range(20))
    return decode_ms(
        engine, [spec(i, prompt, steps + 4, ignore_eos=True) for i in range(batch)], steps
    )


def decode_ms(engine, specs: list, steps: int, between=None) -> float:
    """Median decode step of the batch `specs` (each allowing steps + 4 new tokens), after
    its prefill and 3 warm steps; the engine is cleared after. `between`, if given, is called
    after every step, warm ones included, outside the step's time."""
    result = engine.prefill(1, specs, None)
    for _ in range(3):  # warm
        result = engine.decode([result.batch.id])
        if between is not None:
            between()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        result = engine.decode([result.batch.id])
        times.append(time.perf_counter() - start)
        if between is not None:
            between()
    engine.clear(None)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--codes", action="store_true", help="add the row-major codes' forms")
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    args = parser.parse_args()
    if args.codes:
        for name, options in list(CONFIGS.items()):
            if "quantize" in options and options["dtype"] == "bfloat16":
                CONFIGS[f"{name}, row-major codes"] = dict(options, pack_linear=False)
    from shard.embedded import default_model_dir

    model_dir = default_model_dir()
    bandwidth = read_bandwidth(torch.get_num_threads()) / 1e9
    engines = {
        name: make_engine(model_dir, kv_bytes=256 << 20, max_total=1024, **options)
        for name, options in CONFIGS.items()
    }
    times = {name: (float("inf"), float("inf")) for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, engine in engines.items():
            one, many = step_ms(engine, 1, args.steps), step_ms(engine, 32, args.steps)
            times[name] = (min(times[name][0], one), min(times[name][1], many))
            print(f"round {round_ + 1}: {name}: {one:.1f} / {many:.1f} ms", flush=True)
    streamed = {name: streamed_bytes(engine) for name, engine in engines.items()}
    del engines  # the memory figures come from fresh processes
    rows, base = [], times["bfloat16"]
    for name, (one, many) in times.items():
        mb, rss = streamed[name] / 1e6, peak_rss_mb(CONFIGS[name])
        rate = mb / one  # MB per ms = GB/s
        rows.append(
            f"| {name} | {mb:.0f} | {one:.1f} | {rate:.1f} ({rate / bandwidth:.0%}) | "
            f"{base[0] / one:.2f}x | {many:.1f} | {base[1] / many:.2f}x | {rss:.0f} |"
        )
    lines = [
        "### Quantized decode step, SmolLM2-135M (benchmarks/quant_step.py)",
        "",
        f"{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"read bandwidth {bandwidth:.1f} GB/s (sum over 512 MiB, same run); median of "
        f"{args.steps} steps, fastest of {args.rounds} rounds.",
        "",
        "| weights | MB read per step | batch 1 ms | GB/s (of bandwidth) | batch 1 vs bf16 "
        "| batch 32 ms | batch 32 vs bf16 | shard peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
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
