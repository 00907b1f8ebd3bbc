"""Tensor-parallel ranks see one call order, also while /health is hammered after a failure.

2 and 3 real shard processes and a router. The shards export a span per call (rank, batches
named) to a loopback OTLP collector: that is the record of each rank's call sequence. While
requests run all the time and /health is polled every few milliseconds (each poll after a
failure asks for a liveness prefill), a Prefill fails on every rank (the fault hook's
markers), six times. Then: no call hung, every rank saw the same batch calls in the same
order, later requests give the tokens they gave before the failures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from router.client import LIVENESS_ID
from tests.conftest import build_tiny_model, free_port, wait_http
from tests.test_tracing import (
    Collector,
    collector,  # noqa: F401 - the loopback OTLP collector fixture
)

BATCH_CALLS = ("Prefill", "Decode", "FilterBatch", "ClearCache", "Warmup")
MARKER = "FAULT-MARKER"
ROUNDS = 6
PROMPTS = ["The quick brown fox", "Once upon a time", "1 2 3 4", "In a hole in the ground"]


class Cluster:
    """`world_size` shard processes (ranks over gloo) and a router, as the launcher runs them."""

    def __init__(self, model_dir, workdir, world_size: int, fault, endpoint: str) -> None:
        uds, master_port, self.port = str(workdir / "shard"), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        for rank in range(world_size):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(master_port), "OTEL_BSP_SCHEDULE_DELAY": "100"}  # fmt: skip
            args = [sys.executable, "-m", "shard.cli", "serve", str(model_dir), "--uds-path",
                    uds, "--device", "cpu", "--num-threads", "1", "--kv-cache-memory", "64MiB",
                    "--fault-file", str(fault), "--otlp-endpoint", endpoint]  # fmt: skip
            log = open(workdir / f"shard-{rank}.log", "w")
            self.procs.append(subprocess.Popen(args, env=env, stderr=log))
        deadline = time.monotonic() + 120
        while not all(os.path.exists(f"{uds}-{r}") for r in range(world_size)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in self.procs)
            time.sleep(0.2)
        router = [sys.executable, "-m", "router.cli", "--master-shard-uds-path", uds,
                  "--tokenizer-name", str(model_dir), "--port", str(self.port),
                  "--max-total-tokens", "256", "--max-input-tokens", "64",
                  "--max-batch-prefill-tokens", "128"]  # fmt: skip
        self.procs.append(subprocess.Popen(router, stderr=open(workdir / "router.log", "w")))
        wait_http(self.url + "/health", self.procs)

    def generate(self, prompt: str, new_tokens: int = 8) -> httpx.Response:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens,
                                                 "decoder_input_details": False,
                                                 "details": True}}  # fmt: skip
        return httpx.post(self.url + "/generate", json=body, timeout=120)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _attribute(span, key: str):
    for item in span.attributes:
        if item.key == key:
            value = item.value
            if value.HasField("array_value"):
                return tuple(v.string_value for v in value.array_value.values)
            return value.int_value
    return None


def _calls_by_rank(spans_in: Collector, world_size: int) -> dict[int, list[tuple]]:
    """Each rank's batch calls in the order it received them: (method, batches, failed)."""
    with spans_in.lock:
        spans = [s for svc, s in spans_in.spans if svc == "pytgi.shard" and s.name in BATCH_CALLS]
    by_rank: dict[int, list] = {r: [] for r in range(world_size)}
    for span in sorted(spans, key=lambda s: s.start_time_unix_nano):
        failed = span.status.code == span.status.STATUS_CODE_ERROR
        by_rank[_attribute(span, "shard.rank")].append(
            (span.name, _attribute(span, "batch_ids"), failed)
        )
    return by_rank


def _settled_calls(
    spans_in: Collector, world_size: int, timeout: float = 30
) -> dict[int, list[tuple]]:
    """The records once every rank's count has stopped growing (spans export in batches)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        counts = tuple(len(c) for c in _calls_by_rank(spans_in, world_size).values())
        if counts == last and len(set(counts)) == 1:
            break
        last = counts
        time.sleep(1.0)
    return _calls_by_rank(spans_in, world_size)


def _first_difference(calls: dict[int, list[tuple]]) -> str:
    """Where the ranks' records part: each rank's count and its calls around that point."""
    first = calls[0]
    at = min(
        next(
            (i for i, (a, b) in enumerate(zip(first, seq, strict=False)) if a != b),
            min(len(first), len(seq)),
        )
        for seq in calls.values()
    )
    lines = [f"calls per rank {[len(seq) for seq in calls.values()]}; they differ at #{at}"]
    lines += [f"rank {rank}: {seq[max(0, at - 3) : at + 3]}" for rank, seq in calls.items()]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, smollm_dir, tmp_path_factory) -> dict:
    """Tiny models whose heads divide over 2 ranks, and over 3 (6 heads, 3 KV heads)."""
    three = build_tiny_model(tmp_path_factory.mktemp("tiny-6-heads"), smollm_dir,
                             hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                             intermediate_size=192)  # fmt: skip
    return {2: tiny_model_dir, 3: three}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_one_call_order_while_health_is_hammered_after_a_failure(
    world_size,
    model_dirs,
    tmp_path,
    collector,  # noqa: F811
):
    fault = tmp_path / "fault"
    cluster = Cluster(model_dirs[world_size], tmp_path, world_size, fault, collector.endpoint)
    stop, polls, steady = threading.Event(), [], []
    try:
        before = {p: cluster.generate(p).json()["generated_text"] for p in PROMPTS}

        def hammer() -> None:
            while not stop.is_set():
                start = time.monotonic()
                status = httpx.get(cluster.url + "/health", timeout=60).status_code
                polls.append((status, time.monotonic() - start))
                time.sleep(0.005)

        def keep_busy(prompt: str) -> None:  # requests run throughout
            while not stop.is_set():
                steady.append(cluster.generate(prompt, 12).status_code)

        threads = [threading.Thread(target=hammer)]
        threads += [threading.Thread(target=keep_busy, args=(p,)) for p in PROMPTS[:2]]
        for thread in threads:
            thread.start()
        markers: list[str] = []
        for round_ in range(ROUNDS):  # each marker fails one Prefill, on every rank
            time.sleep(0.4)
            markers.append(f"{MARKER}-{round_}")
            (tmp_path / "fault.new").write_text("\n".join(markers))
            os.replace(tmp_path / "fault.new", fault)  # ranks read all markers or none new
            assert cluster.generate(f"{markers[-1]} hello", 4).status_code == 424  # as TGI
        deadline = time.monotonic() + 60
        while httpx.get(cluster.url + "/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the shards never came back"
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a call hung"
        after = {p: cluster.generate(p).json()["generated_text"] for p in PROMPTS}
        assert after == before
        assert set(steady) <= {200, 424} and 200 in steady
        assert len(polls) >= 10 and max(seconds for _, seconds in polls) < 30
        calls = _settled_calls(collector, world_size)
    finally:
        stop.set()
        cluster.stop()
    sequences = list(calls.values())
    assert all(seq == sequences[0] for seq in sequences), _first_difference(calls)
    failed = [c for c in sequences[0] if c[2]]
    assert len(failed) == ROUNDS and all(name == "Prefill" for name, _, _ in failed)
    assert any(name == "Prefill" and ids[0] == str(LIVENESS_ID) for name, ids, _ in sequences[0])
