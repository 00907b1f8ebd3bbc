"""Per-process peak RSS (VmHWM) of the shards and the router, at 1 and 3 tensor-parallel
shards, on the embedded SmolLM2-135M after a few requests. `--append` records it in RESULTS.md."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(num_shard: int, port: int) -> list[tuple[str, float]]:
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--num-shard", str(num_shard), "--port", str(port),
         "--master-port", str(port + 1000), "--max-batch-prefill-tokens", "512", "--kv-cache-memory", "256MiB"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if launcher.poll() is not None:
                    sys.exit("launcher failed")
                time.sleep(0.5)
        body = json.dumps(
            {"inputs": "Tell me about the sea. " * 20, "parameters": {"max_new_tokens": 32}}
        ).encode()
        for _ in range(3):
            request = urllib.request.Request(
                url + "/generate", body, {"content-type": "application/json"}
            )
            urllib.request.urlopen(request, timeout=300).read()
        rows = []
        for pid in children(launcher.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            if "shard.cli" in cmdline:
                name = (
                    "shard rank "
                    + (Path(f"/proc/{pid}/environ").read_text().split("RANK=")[1].split("\0")[0])
                )
            elif "router.cli" in cmdline:
                name = "router"
            else:
                continue
            rows.append((name, peak_rss_mib(pid)))
        return sorted(rows)
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)


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
