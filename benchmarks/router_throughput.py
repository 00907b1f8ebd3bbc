"""The router's own cost per streamed token, with a stub shard that answers at once.

A GPU step of a few milliseconds leaves the router (Python) as the serving path's limit
when it streams many requests: every step it merges the shard's reply, wakes each request's
stream and writes an SSE event per token. Here the shard is a stub gRPC server speaking the
same protocol (one token per running request per call, no model), so the router runs as
fast as it can; the table gives, per concurrency, the output tokens/s the router streamed
and the CPU time per token of the router, the stub and the load generator (from /proc).

    .venv/bin/python benchmarks/router_throughput.py [--concurrency 1 32 128] [--append]

Run with nothing else on the machine (../shared/BENCHMARKING.md); on a 2-core machine the
three processes share the cores, so the CPU per token is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadgen import run_load, summarize  # noqa: E402
from workloads import Request  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TICK = os.sysconf("SC_CLK_TCK")


class StubShard:
    """The shard's protocol without a model: a request's token `k` is id 1000 + k % 100,
    text " w"; it finishes (length) after max_new_tokens. Batches hold request ids; a
    finished request stays in its batch until FilterBatch, as the router expects."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.batches: dict[int, list[int]] = {}
        self.limits: dict[int, int] = {}  # request id -> max_new_tokens
        self.generated: dict[int, int] = {}

    def _cached(self, pb, batch_id: int):
        ids = self.batches[batch_id]
        return pb.CachedBatch(id=batch_id, request_ids=ids, size=len(ids),
                              max_tokens=len(ids) * 2048, current_tokens=len(ids))  # fmt: skip

    def _step(self, pb, batch_id: int, reply) -> None:
        """One token for each unfinished request of the batch, into `reply`."""
        for rid in self.batches[batch_id]:
            done = self.generated[rid]
            if done >= self.limits[rid]:
                continue
            self.generated[rid] = done = done + 1
            g = reply.generations.add(request_id=rid)
            g.tokens.ids.append(1000 + done % 100)
            g.tokens.logprobs.append(-0.5)
            g.tokens.texts.append(" w")
            g.tokens.is_special.append(False)
            if done == self.limits[rid]:
                g.generated_text.text = " w" * done
                g.generated_text.generated_tokens = done
                g.generated_text.finish_reason = pb.FINISH_REASON_LENGTH
        reply.batch.CopyFrom(self._cached(pb, batch_id))

    def _drop(self, ids) -> None:
        for rid in ids:
            self.limits.pop(rid, None)
            self.generated.pop(rid, None)

    # ---- the servicer's calls (pb: the generated module) ----
    def servicer(self, pb, base):
        stub = self

        class Servicer(base):
            async def ServiceDiscovery(self, request, context):
                return pb.ServiceDiscoveryResponse(urls=[stub.url])

            async def Health(self, request, context):
                return pb.HealthResponse()

            async def Info(self, request, context):
                return pb.InfoResponse(dtype="stub", device_type="cpu", block_size=16,
                                       attention_impl="stub", kv_cache_blocks=1 << 16,
                                       device_name="stub")  # fmt: skip

            async def Warmup(self, request, context):
                return pb.WarmupResponse(max_supported_total_tokens=(1 << 16) * 16 - 16,
                                         max_input_tokens=1024, max_total_tokens=4096)  # fmt: skip

            async def ClearCache(self, request, context):
                ids = [request.id] if request.HasField("id") else list(stub.batches)
                for batch_id in ids:
                    stub._drop(stub.batches.pop(batch_id, []))
                return pb.ClearCacheResponse()

            async def FilterBatch(self, request, context):
                keep = set(request.request_ids)
                ids = stub.batches[request.batch_id]
                stub._drop(i for i in ids if i not in keep)
                stub.batches[request.batch_id] = [i for i in ids if i in keep]
                return pb.FilterBatchResponse(batch=stub._cached(pb, request.batch_id))

            async def Prefill(self, request, context):
                new = [r.id for r in request.batch.requests]
                for r in request.batch.requests:
                    stub.limits[r.id] = r.stopping_parameters.max_new_tokens
                    stub.generated[r.id] = 0
                if request.HasField("cached_batch"):
                    batch_id = request.cached_batch.id
                    stub.batches[batch_id].extend(new)
                else:
                    batch_id = request.batch.id
                    stub.batches[batch_id] = new
                reply = pb.PrefillResponse()
                stub._step(pb, batch_id, reply)
                return reply

            async def Decode(self, request, context):
                first, *others = [b.id for b in request.batches]
                for other in others:
                    stub.batches[first].extend(stub.batches.pop(other))
                reply = pb.DecodeResponse()
                stub._step(pb, first, reply)
                return reply

        return Servicer()


async def serve_stub(path: str) -> None:
    import grpc

    from common.pb import pb, pb_grpc

    url = f"unix://{path}"
    server = grpc.aio.server()
    stub = StubShard(url)
    pb_grpc.add_TextGenerationServiceServicer_to_server(
        stub.servicer(pb, pb_grpc.TextGenerationServiceServicer), server
    )
    server.add_insecure_port(url)
    await server.start()
    await server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_ready(url: str, router: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if router.poll() is not None:
            sys.exit("the router exited during start-up")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit("the router did not start")


def measure(
    url: str, pids: dict[str, int], concurrency: int, new_tokens: int, seconds: float
) -> dict:
    requests = [Request("Hello there", new_tokens, 2) for _ in range(max(8, 4 * concurrency))]
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    mine = os.times()
    results, wall = asyncio.run(run_load(url, "tgi", requests, concurrency, None, seconds))
    mine_after = os.times()
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    used["load generator"] = (mine_after.user + mine_after.system) - (mine.user + mine.system)
    summary = summarize(results, wall, f"c={concurrency}")
    tokens = max(summary["output_tokens"], 1)
    return {"concurrency": concurrency, "tok/s": summary["output_token_throughput"],
            "failed": summary["requests"] - summary["completed"],
            **{name: seconds / tokens * 1e6 for name, seconds in used.items()}}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| concurrency | output tok/s | router µs CPU / token | stub shard µs / token "
        "| load generator µs / token | failed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['tok/s']:.0f} | {r['router']:.0f} "
                     f"| {r['stub shard']:.0f} | {r['load generator']:.0f} | {r['failed']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0, help="most seconds a run takes")
    parser.add_argument("--port", type=int, default=3981)
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--stub", help=argparse.SUPPRESS)  # the child: serve the stub here
    args = parser.parse_args()
    if args.stub:
        asyncio.run(serve_stub(args.stub))
        return
    from shard.embedded import default_model_dir

    path = os.path.join(tempfile.mkdtemp(prefix="pytgi-stub-"), "shard-0")
    here = Path(__file__).resolve()
    stub = subprocess.Popen([sys.executable, str(here), "--stub", path])
    url = f"http://127.0.0.1:{args.port}"
    router = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "--master-shard-uds-path", path[: -len("-0")],
         "--tokenizer-name", str(default_model_dir()), "--hostname", "127.0.0.1",
         "--port", str(args.port), "--max-concurrent-requests", "1024",
         "--no-prefix-caching"],
        cwd=here.parents[1],
    )  # fmt: skip
    try:
        wait_ready(url, router)
        pids = {"router": router.pid, "stub shard": stub.pid}
        rows = [measure(url, pids, c, args.new_tokens, args.seconds) for c in args.concurrency]
    finally:
        router.terminate()
        stub.terminate()
        router.wait(timeout=60)
        stub.wait(timeout=60)
    text = table(rows)
    print(text)
    if args.append:
        with RESULTS.open("a") as f:
            f.write(f"\n### Router cost per streamed token ({time.strftime('%Y-%m-%d')})\n\n")
            f.write(f"`benchmarks/router_throughput.py`, {args.new_tokens} new tokens\n\n{text}\n")


if __name__ == "__main__":
    main()
