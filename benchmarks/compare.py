"""pytgi against transformers on the same workload, weights, dtype and threads, in one run.

Systems: pytgi through its HTTP API (`pytgi-launcher`, streamed by loadgen.py);
transformers `generate` on static left-padded batches of `concurrency` requests;
transformers' own continuous batching (`generate_batch`, paged attention) where the
installed version has it. EOS is ignored everywhere, so every system does the same work;
useful output tokens (each request's own max_new_tokens) are counted, padding is not.
Static-batch TTFT is the batch's prefill time (a `max_new_tokens=1` generate of the batch).
Prints a table with ratios; `--append` adds it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launched import launcher  # noqa: E402
from loadgen import run_load, summarize  # noqa: E402
from workloads import WORKLOADS, Request, single_token_words  # noqa: E402

from common.procinfo import child_roles, peak_rss_mib  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def pytgi(requests: list[Request], concurrency: int, port: int, dtype: str, model_dir: Path,
          extra: list[str]) -> dict:  # fmt: skip
    flags = ["--model-id", str(model_dir), "--dtype", dtype, "--max-total-tokens", "1024",
             "--max-input-tokens", "768", "--max-batch-prefill-tokens", "512", "--kv-cache-memory", "2GiB",
             *extra]  # fmt: skip
    with launcher(port, *flags) as server:
        results, seconds = asyncio.run(
            run_load(server.url, "tgi", requests, concurrency, None, 3600)
        )
        summary = summarize(results, seconds, f"concurrency {concurrency}")
        rss = [peak_rss_mib(pid) for pid in child_roles(server.process.pid)]
    return {"tokens_per_s": summary["output_token_throughput"], "ttft_p50": summary["ttft_s"]["median"],
            "failures": sum(summary["failures"].values()), "peak_rss_mib": sum(v or 0 for v in rss)}  # fmt: skip


def _ids(tokenizer, requests: list[Request]) -> list[list[int]]:
    return [tokenizer(r.prompt, add_special_tokens=False).input_ids for r in requests]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def static_batching(model, tokenizer, requests: list[Request], concurrency: int) -> dict:
    useful, elapsed, ttfts = 0, 0.0, []
    for start in range(0, len(requests), concurrency):
        batch = requests[start : start + concurrency]
        tokenizer.padding_side = "left"
        enc = tokenizer(
            [r.prompt for r in batch], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        longest = max(r.max_new_tokens for r in batch)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(
                **enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            _sync()
            ttfts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            _sync()
            elapsed += time.perf_counter() - t0
        useful += sum(r.max_new_tokens for r in batch)
    return {"tokens_per_s": useful / elapsed, "ttft_p50": statistics.median(ttfts), "failures": 0}


def continuous_batching(model, tokenizer, requests: list[Request]) -> dict | None:
    """transformers' generate_batch. Its 4.57 memory planner asks the CUDA allocator for free
    memory (None on CPU), so it is given the same 2 GiB budget as pytgi's KV cache."""
    if not hasattr(model, "generate_batch"):
        return None
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching import cache as cb_cache

    cb_cache.PagedAttentionMemoryHandler.get_available_memory = staticmethod(
        lambda max_memory_percent=1.0: int(2 * 2**30 * max_memory_percent)
    )
    longest = max(r.max_new_tokens for r in requests)
    config = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=-1,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    t0 = time.perf_counter()
    outputs = model.generate_batch(
        inputs=_ids(tokenizer, requests), generation_config=config, progress_bar=False
    )
    elapsed = time.perf_counter() - t0
    if len(outputs) != len(requests) or any(o.error for o in outputs.values()):
        raise RuntimeError("transformers continuous batching failed")
    # every request ran to the longest length here, so count only its useful tokens
    useful = sum(
        min(len(o.generated_tokens), r.max_new_tokens)
        for o, r in zip(outputs.values(), requests, strict=True)
    )
    return {"tokens_per_s": useful / elapsed, "ttft_p50": float("nan"), "failures": 0}


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _paged_sdpa() -> str:
    """transformers' name for SDPA over its paged cache (renamed in transformers 5)."""
    import transformers

    return "paged|sdpa" if int(transformers.__version__.split(".")[0]) >= 5 else "sdpa_paged"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--port", type=int, default=3995)
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--model-dir", type=Path, help="default: the embedded SmolLM2")
    parser.add_argument("--device", default="cpu", help="where transformers runs: cpu or cuda")
    parser.add_argument("--launcher-arg", action="append", default=[], help="extra launcher flag")
    parser.add_argument("--no-cb", action="store_true", help="skip transformers' generate_batch")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shard.embedded import default_model_dir

    model_dir = args.model_dir or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = single_token_words(model_dir)
    rows = []
    for workload in args.workload or ["fixed", "varied"]:
        for concurrency in args.concurrency or [32, 1]:
            count = args.requests if concurrency > 1 else max(2, args.requests // 16)
            requests = WORKLOADS[workload](count, 0, words)
            ours = pytgi(requests, concurrency, args.port, args.dtype, model_dir, args.launcher_arg)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, args.dtype)
            ).eval()
            static = static_batching(model.to(args.device), tokenizer, requests, concurrency)
            del model
            cb = None
            if concurrency > 1 and not args.no_cb:
                model = AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=getattr(torch, args.dtype), attn_implementation=_paged_sdpa()
                ).eval()
                cb = continuous_batching(model.to(args.device), tokenizer, requests)
                del model
            rows.append((workload, concurrency, count, ours, static, cb))
    import resource

    transformers_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, dtype {args.dtype}, {model_dir.name}, {_device_name(args.device)}",
        "",
        "| workload | concurrency | requests | pytgi tok/s | static tok/s | CB tok/s | pytgi/static | pytgi/CB | TTFT p50 pytgi s | TTFT p50 static s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, concurrency, count, ours, static, cb in rows:
        cb_rate = f"{cb['tokens_per_s']:.1f}" if cb else "-"
        cb_ratio = f"{ours['tokens_per_s'] / cb['tokens_per_s']:.2f}x" if cb else "-"
        lines.append(
            f"| {workload} | {concurrency} | {count} | {ours['tokens_per_s']:.1f} | {static['tokens_per_s']:.1f} | {cb_rate} | "
            f"{ours['tokens_per_s'] / static['tokens_per_s']:.2f}x | {cb_ratio} | {ours['ttft_p50']:.2f} | {static['ttft_p50']:.2f} |"
        )
    lines.append("")
    lines.append(
        "Peak RSS: pytgi shard + router "
        + ", ".join(f"{r[3]['peak_rss_mib']:.0f}" for r in rows)
        + f" MiB per run; this process (transformers, all runs) {transformers_rss:.0f} MiB."
    )
    text = "\n".join(lines)
    print(text)
    if args.json:
        fields = ("workload", "concurrency", "requests", "pytgi", "static", "cb")
        args.json.write_text(
            json.dumps([dict(zip(fields, r, strict=True)) for r in rows], indent=1)
        )
    if args.append:
        command = (
            "python benchmarks/compare.py " + " ".join(sys.argv[1:]).replace("--append", "").strip()
        )
        with RESULTS.open("a") as f:
            f.write(
                f"\n## pytgi vs transformers, HTTP load ({time.strftime('%Y-%m-%d')})\n\nCommand: `{command}`\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
