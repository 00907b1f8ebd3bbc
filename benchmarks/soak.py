"""Soak: many requests of mixed lengths at a fixed concurrency, some cancelled by their clients,
some hostile (values at the edges of their wire types, which must get 422 and hurt nobody).

Every request must end with its full answer or a clear error; afterwards no KV block may be
held, and the router's and shard's memory must not drift. `run_soak` is used by the test
suite (tests/test_reliability.py); run this file to soak a server you started yourself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
from launched import launcher

from common.procinfo import child_roles


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


HOSTILE_PARAMETERS = [
    {"stop": ["\ud800"]},
    {"top_k": 2**32},
    {"top_p": 1e-50},
    {"temperature": 1e39},
    {"temperature": 1e-38, "do_sample": True},
    {"repetition_penalty": 1e39},
    {"top_n_tokens": 2**32},
    {"stop": ["s" * 100_000]},
]


async def _hostile(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    body = {"inputs": "hostile", "parameters": rng.choice(HOSTILE_PARAMETERS)}
    headers = {"content-type": "application/json"}  # json.dumps escapes lone surrogates
    reply = await client.post(url + "/generate", content=json.dumps(body), headers=headers)
    if reply.status_code == 422 and reply.json()["error_type"] == "validation":
        return "hostile refused"
    return f"hostile answered {reply.status_code}"


async def _one(client: httpx.AsyncClient, url: str, rng: random.Random, cancel: bool) -> str:
    words = rng.randint(4, 120)
    new_tokens = rng.randint(1, 48)
    body = {"inputs": " ".join(rng.choice(["sea", "sky", "tree", "stone", "river"]) for _ in range(words)),
            "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True, "details": True}}  # fmt: skip
    if cancel:
        async with client.stream("POST", url + "/generate_stream", json=body) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data:"):
                    return "cancelled"
        return "cancelled"
    reply = await client.post(url + "/generate", json=body)
    if reply.status_code != 200:
        payload = reply.json()
        assert payload["error"] and payload["error_type"]
        return f"error {reply.status_code} {payload['error_type']}"
    if reply.json()["details"]["generated_tokens"] != new_tokens:
        return "incomplete"
    return "ok"


async def run_soak(
    url: str,
    total: int,
    concurrency: int,
    cancel_fraction: float,
    seed: int,
    pids: dict[str, int],
    time_limit: float,
    hostile_fraction: float = 0.05,
) -> dict:
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    memory: dict[str, list[float]] = {name: [] for name in pids}
    sent = 0
    started = time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < total and time.monotonic() - started < time_limit:
            sent += 1
            if sent % max(1, total // 20) == 0:
                for name, pid in pids.items():
                    memory[name].append(rss_mib(pid))
            try:
                draw = rng.random()
                if draw < hostile_fraction:
                    outcomes[await _hostile(client, url, rng)] += 1
                    continue
                cancel = draw < hostile_fraction + cancel_fraction
                outcomes[await _one(client, url, rng, cancel)] += 1
            except httpx.HTTPError as exc:
                outcomes[f"transport {type(exc).__name__}"] += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    drift = {}
    for name, samples in memory.items():
        quarter = max(1, len(samples) // 4)
        first, last = sum(samples[:quarter]) / quarter, sum(samples[-quarter:]) / quarter
        drift[name] = {
            "first_quarter_mib": round(first, 1),
            "last_quarter_mib": round(last, 1),
            "drift": round(last / first - 1, 4),
        }
    return {
        "sent": sent,
        "seconds": round(time.monotonic() - started, 1),
        "outcomes": dict(outcomes),
        "memory": drift,
    }


def _metric(url: str, name: str) -> float:
    import urllib.request

    for line in urllib.request.urlopen(url + "/metrics").read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _soak_args(url: str, pids: dict[str, int], args) -> Coroutine[Any, Any, dict]:
    """`run_soak` with the command line's settings (seed 0, at most an hour)."""
    return run_soak(
        url, args.requests, args.concurrency, args.cancel_fraction, 0, pids, 3600,
        args.hostile_fraction,
    )  # fmt: skip


def launch_and_soak(args) -> dict:
    """Starts pytgi-launcher on the embedded model, soaks it, stops it with SIGTERM."""
    flags = ["--max-total-tokens", "512", "--max-input-tokens", "256", "--max-batch-prefill-tokens",
             "512", "--kv-cache-memory", "1GiB", "--max-concurrent-requests", "256"]  # fmt: skip
    with launcher(args.port, *flags) as server:
        pids = {role.split()[0]: pid for pid, role in child_roles(server.process.pid).items()}
        report = asyncio.run(_soak_args(server.url, pids, args))
        time.sleep(1)
        report["kv_blocks_used_after"] = _metric(server.url, "pytgi_kv_blocks_used")
    report["launcher_exit_code"] = server.exit_code
    report["teardown_seconds"] = server.teardown_s
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=None, help="soak a running server (else launch one)")
    parser.add_argument("--port", type=int, default=3991)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--hostile-fraction", type=float, default=0.05)
    parser.add_argument("--router-pid", type=int, default=None)
    parser.add_argument("--shard-pid", type=int, default=None)
    args = parser.parse_args()
    if args.url is None:
        report = launch_and_soak(args)
    else:
        pids = {k: v for k, v in (("router", args.router_pid), ("shard", args.shard_pid)) if v}
        report = asyncio.run(_soak_args(args.url, pids, args))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
