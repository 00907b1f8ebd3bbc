"""Issue 9's two measurements on the embedded SmolLM2-135M, side by side in one run.

1. Chunked prefill: a running stream's inter-token latency while a ~4,000-token prompt
   arrives, with prefill chunks of 256 tokens vs one whole-prompt prefill (4,096 budget).
2. Prefix cache: a ~1,000-token shared system prompt, one warm-up request, then 64 requests
   (16 at a time): TTFT p50 with the cache on vs off.
`--append` adds the tables to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SYSTEM = ("You are a meticulous assistant for a shipping company. Follow the rules: be brief, cite "
          "the policy section, never invent tracking numbers, ask for the order id when missing. ") * 30  # fmt: skip


def launch(port: int, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "--port",
            str(port),
            "--kv-cache-memory",
            "1GiB",
            *args,
        ],
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit("launcher failed")
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


async def itl_during_long_prompt(url: str) -> tuple[float, float]:
    """(median, max) gap between tokens of a running stream while a long prompt is prefilled."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        gaps: list[float] = []
        long_prompt = "The history of the lighthouse is long and winding. " * 400

        async def stream():
            body = {
                "inputs": "Tell me a story.",
                "parameters": {"max_new_tokens": 120, "ignore_eos": True},
            }
            last = None
            async with client.stream("POST", "/generate_stream", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data:"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now

        task = asyncio.ensure_future(stream())
        await asyncio.sleep(2.0)
        body = {"inputs": long_prompt, "parameters": {"max_new_tokens": 1, "truncate": 4000}}
        reply = await client.post("/generate", json=body)
        assert reply.status_code == 200, reply.text
        await task
    return statistics.median(gaps), max(gaps)


async def shared_prefix_ttft(url: str) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def ttft(question: str) -> float:
            body = {
                "inputs": SYSTEM + question,
                "parameters": {"max_new_tokens": 4, "ignore_eos": True},
            }
            start = time.perf_counter()
            async with client.stream("POST", "/generate_stream", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data:"):
                        return time.perf_counter() - start
            raise RuntimeError("no token")

        await ttft("Warm-up: hello.")
        limit = asyncio.Semaphore(16)

        async def bounded(i: int) -> float:
            async with limit:
                return await ttft(f"Question {i}: where is order {1000 + i}?")

        return list(await asyncio.gather(*(bounded(i) for i in range(64))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    long_limits = ["--max-total-tokens", "4200", "--max-input-tokens", "4096"]
    rows_itl = []
    for label, budget in (("chunks of 256", "256"), ("whole prompt (4096)", "4096")):
        proc = launch(3993, *long_limits, "--max-batch-prefill-tokens", budget)
        try:
            rows_itl.append((label, *asyncio.run(itl_during_long_prompt("http://127.0.0.1:3993"))))
        finally:
            stop(proc)
    rows_ttft = []
    for label, flag in (
        ("prefix cache on", "--prefix-caching"),
        ("prefix cache off", "--no-prefix-caching"),
    ):
        proc = launch(
            3994,
            "--max-total-tokens",
            "2048",
            "--max-input-tokens",
            "1500",
            "--max-batch-prefill-tokens",
            "1024",
            flag,
        )
        try:
            ttfts = asyncio.run(shared_prefix_ttft("http://127.0.0.1:3994"))
        finally:
            stop(proc)
        rows_ttft.append((label, statistics.median(ttfts), statistics.quantiles(ttfts, n=10)[-1]))
    speedup = rows_ttft[1][1] / rows_ttft[0][1]
    text = "\n".join(
        [
            "Inter-token latency of a running stream while a 4,000-token prompt is prefilled:",
            "",
            "| prefill | ITL median s | ITL max s |",
            "|---|---:|---:|",
            *[f"| {label} | {median:.3f} | {worst:.3f} |" for label, median, worst in rows_itl],
            "",
            "Shared ~1,000-token system prompt, 64 requests (16 concurrent) after one warm-up:",
            "",
            "| setting | TTFT p50 s | TTFT p90 s |",
            "|---|---:|---:|",
            *[f"| {label} | {p50:.3f} | {p90:.3f} |" for label, p50, p90 in rows_ttft],
            f"| TTFT p50 speed-up with the cache | {speedup:.1f}x | |",
        ]
    )
    print(text)
    print(json.dumps({"itl": rows_itl, "ttft": rows_ttft}))
    if args.append:
        with RESULTS.open("a") as f:
            f.write(
                f"\n## Prefix caching and chunked prefill (issue 9, {time.strftime('%Y-%m-%d')})\n\n"
            )
            f.write("Command: `python benchmarks/prefix_and_chunking.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
