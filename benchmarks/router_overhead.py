"""Router overhead at concurrency 1: HTTP end-to-end latency of a request against the shard's
own Prefill + Decode time for the same request (direct gRPC, router idle), same processes.

Starts `pytgi-launcher` on the embedded model, alternates the two measurements, prints
medians and their ratio; `--append` adds the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from router.client import ShardedClient
from router.types import Params, ShardRequest

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def http_generate(url: str, new_tokens: int) -> float:
    body = json.dumps(
        {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}
    )
    request = urllib.request.Request(
        url + "/generate", body.encode(), {"content-type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as reply:
        reply.read()
    return time.perf_counter() - start


_IDS = itertools.count(10**9)  # request and batch ids the router never uses; one per call
DIRECT_BLOCKS = 16  # the pool's last blocks: 256 tokens, more than prompt + new tokens


async def grpc_generate(client: ShardedClient, new_tokens: int) -> float:
    """One request straight to the shard, in the pool's last blocks (the router is idle and
    runs without prefix caching, so no block of its is live)."""
    params = Params(max_new_tokens=new_tokens, ignore_eos=True)
    rid = next(_IDS)
    total = (await client.info()).kv_cache_blocks
    blocks = list(range(total - DIRECT_BLOCKS, total))
    request = ShardRequest(rid, PROMPT, params, blocks, 16)
    start = time.perf_counter()
    step = await client.prefill(rid, [request], None)
    if step.refused:
        sys.exit(f"the shard refused the direct request: {step.refused}")
    while step.batch is not None:
        step = await client.decode([step.batch])
    return time.perf_counter() - start


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    while True:
        if proc.poll() is not None:
            sys.exit("the launcher exited during start-up")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=3977)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    uds = os.path.join(tempfile.mkdtemp(prefix="pytgi-bench-"), "shard")
    url = f"http://127.0.0.1:{args.port}"
    secret = secrets.token_urlsafe(16)  # the shards refuse calls without it
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--port", str(args.port), "--shard-uds-path", uds,
         "--max-batch-prefill-tokens", "512", "--max-total-tokens", "2048", "--kv-cache-memory", "512MiB",
         "--no-prefix-caching"],
        stderr=subprocess.DEVNULL, env={**os.environ, "SHARD_SECRET": secret},
    )  # fmt: skip
    try:
        wait_ready(url, launcher)

        async def measure():
            client = ShardedClient([f"unix://{uds}-0"], secret)
            http, direct = [], []
            await grpc_generate(client, 4)  # warm both paths
            http_generate(url, 4)
            for _ in range(args.runs):
                direct.append(await grpc_generate(client, args.new_tokens))
                http.append(await asyncio.to_thread(http_generate, url, args.new_tokens))
            await client.close()
            return http, direct

        http, direct = asyncio.run(measure())
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
    ratio = statistics.median(http) / statistics.median(direct)
    text = "\n".join(
        [
            f"{args.runs} runs, prompt of {len(PROMPT.split())} words, {args.new_tokens} new tokens, ignore_eos",
            "",
            "| path | median s | min s |",
            "|---|---:|---:|",
            f"| HTTP /generate through the router | {statistics.median(http):.3f} | {min(http):.3f} |",
            f"| gRPC Prefill + Decode to the shard | {statistics.median(direct):.3f} | {min(direct):.3f} |",
            f"| router overhead (ratio of medians) | {ratio:.3f} | |",
        ]
    )
    print(text)
    if args.append:
        with RESULTS.open("a") as f:
            f.write(f"\n### Router overhead at concurrency 1 ({time.strftime('%Y-%m-%d')})\n\n")
            f.write(
                f"Command: `python benchmarks/router_overhead.py --runs {args.runs}`\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
