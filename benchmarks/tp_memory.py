"""Per-process peak RSS (VmHWM) of the shards and the router, at 1 and 3 tensor-parallel
shards, on the embedded SmolLM2-135M after a few requests. `--append` records it in RESULTS.md."""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

from launched import launcher

from common.procinfo import child_roles, peak_rss_mib

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def measure(num_shard: int, port: int) -> list[tuple[str, float]]:
    flags = ["--num-shard", str(num_shard), "--master-port", str(port + 1000),
             "--max-batch-prefill-tokens", "512", "--kv-cache-memory", "256MiB"]  # fmt: skip
    with launcher(port, *flags) as server:
        body = json.dumps(
            {"inputs": "Tell me about the sea. " * 20, "parameters": {"max_new_tokens": 32}}
        ).encode()
        for _ in range(3):
            request = urllib.request.Request(
                server.url + "/generate", body, {"content-type": "application/json"}
            )
            urllib.request.urlopen(request, timeout=300).read()
        roles = child_roles(server.process.pid)
        return sorted((role, peak_rss_mib(pid) or float("nan")) for pid, role in roles.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    lines = ["| shards | process | peak RSS (MiB) |", "|---:|---|---:|"]
    for num_shard, port in ((1, 3981), (3, 3982)):
        for name, rss in measure(num_shard, port):
            lines.append(f"| {num_shard} | {name} | {rss:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.append:
        with RESULTS.open("a") as f:
            f.write(
                f"\n### Peak RSS per process, 1 vs 3 tensor-parallel shards ({time.strftime('%Y-%m-%d')})\n\n"
            )
            f.write(
                "Command: `python benchmarks/tp_memory.py` (KV cache 256 MiB per rank; 3 requests served)\n\n"
            )
            f.write(text + "\n")


if __name__ == "__main__":
    main()
