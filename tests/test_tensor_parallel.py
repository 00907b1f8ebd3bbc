"""Tensor parallelism on CPU (gloo): sharded ranks give the single-shard tokens."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from common.grammar import GrammarSpec
from router.client import ShardedClient
from router.types import Params, ShardRequest
from tests.conftest import free_port
from tests.helpers import make_engine, run_to_end, spec
from tests.test_engine_smollm import QUESTIONS


class ShardGroup:
    def __init__(self, model_dir, world_size: int, workdir, args=()) -> None:
        self.uds = str(workdir / f"tp{world_size}")
        port = str(free_port())
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "shard.cli", "serve", str(model_dir), "--uds-path", self.uds,
                 "--kv-cache-memory", "128MiB", "--rank", str(rank), "--world-size", str(world_size),
                 "--master-port", port, *args],
                stderr=open(workdir / f"tp{world_size}-{rank}.log", "w"),
            )
            for rank in range(world_size)
        ]  # fmt: skip
        deadline = time.monotonic() + 180
        for rank in range(world_size):
            while not os.path.exists(f"{self.uds}-{rank}"):
                assert all(p.poll() is None for p in self.procs), (
                    workdir / f"tp{world_size}-{rank}.log"
                ).read_text()
                assert time.monotonic() < deadline
                time.sleep(0.2)

    def generate(self, prompts: list[str], new_tokens: int, grammars=None) -> tuple[dict, dict]:
        """`grammars`: request index -> GrammarSpec for constrained rows."""
        grammars = grammars or {}

        async def go():
            client = await ShardedClient.connect(f"unix://{self.uds}-0")
            await client.warmup(None, 64, 1024)
            params = Params(max_new_tokens=new_tokens, ignore_eos=True, add_special_tokens=False)
            requests = [
                ShardRequest(i, p, replace(params, grammar=grammars.get(i)), [], 16)
                for i, p in enumerate(prompts)
            ]
            tokens, logprobs = {}, {}
            step = await client.prefill(1, requests, None)
            while True:
                for g in step.generations:
                    tokens.setdefault(g.request_id, []).extend(t.id for t in g.tokens)
                    logprobs.setdefault(g.request_id, []).extend(t.logprob for t in g.tokens)
                if step.batch is None:
                    break
                step = await client.decode([step.batch])
            await client.close()
            return tokens, logprobs

        return asyncio.run(go())

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)


def _single(model_dir, prompts, new_tokens, grammars=None):
    grammars = grammars or {}
    engine = make_engine(model_dir)
    specs = [
        spec(i, p, new_tokens, ignore_eos=True, grammar=grammars.get(i))
        for i, p in enumerate(prompts)
    ]
    c = run_to_end(engine, 1, specs)
    return c.tokens, c.logprobs


def test_smollm_three_shards_equal_one(smollm_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    expected_tokens, expected_logprobs = _single(smollm_dir, prompts, 16)
    group = ShardGroup(smollm_dir, 3, tmp_path)
    try:
        tokens, logprobs = group.generate(prompts, 16)
    finally:
        group.stop()
    assert tokens == expected_tokens
    for i in expected_tokens:
        assert (
            max(abs(a - b) for a, b in zip(logprobs[i], expected_logprobs[i], strict=True)) < 1e-3
        )


@pytest.mark.parametrize("world_size", [2, 4])
def test_tiny_model_equal_tokens_at_2_and_4_shards(tiny_model_dir, tmp_path, world_size):
    """Constrained rows too: every rank runs the same grammar and masks alike."""
    from common.grammar import REGEX, json_schema_spec

    prompts = ["The quick brown fox", "Hello there", "1 2 3 4 5 6 7", "In a hole in the ground"]
    prompts += ["A record:", "A code:"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammars = {4: json_schema_spec(schema), 5: GrammarSpec(REGEX, "[A-Z]{3}-[0-9]{2}")}
    expected, _ = _single(tiny_model_dir, prompts, 8, grammars)
    group = ShardGroup(tiny_model_dir, world_size, tmp_path)
    try:
        tokens, _ = group.generate(prompts, 8, grammars)
    finally:
        group.stop()
    assert tokens == expected


def test_rank_that_never_joins_is_a_clear_error(tiny_model_dir, tmp_path):
    """Rank 0 of 2 alone: it gives up after --distributed-timeout with a message."""
    result = subprocess.run(
        [sys.executable, "-m", "shard.cli", "serve", str(tiny_model_dir), "--uds-path", str(tmp_path / "x"),
         "--rank", "0", "--world-size", "2", "--master-port", str(free_port()), "--distributed-timeout", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "could not join the 2-rank gloo group" in result.stderr


def test_launcher_refuses_two_shards_for_smollm(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "--num-shard", "2", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        "cannot shard over 2 ranks" in result.stderr
        and "shard counts that work: 1, 3" in result.stderr
    )


def test_two_nodes_on_one_machine(tiny_model_dir, tmp_path):
    """Two launchers as two 'nodes' (1 rank each) form one group over TCP; node 0's router
    serves the same greedy tokens as a single shard."""
    import httpx

    from tests.conftest import wait_http

    master, http_port, grpc_base = free_port(), free_port(), free_port()
    common = ["--model-id", str(tiny_model_dir), "--nnodes", "2", "--master-port", str(master),
              "--shard-host", "127.0.0.1", "--shard-port-base", str(grpc_base), "--kv-cache-memory", "64MiB",
              "--max-total-tokens", "1024", "--max-batch-prefill-tokens", "128"]  # fmt: skip
    env = {**os.environ, "SHARD_SECRET": "group-secret"}
    node1 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            *common,
            "--node-rank",
            "1",
            "--port",
            str(free_port()),
        ],
        stderr=open(tmp_path / "node1.log", "w"),
        env=env,
    )
    node0 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            *common,
            "--node-rank",
            "0",
            "--port",
            str(http_port),
        ],
        stderr=open(tmp_path / "node0.log", "w"),
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_http(url + "/health", [node0, node1], timeout=300)
        assert httpx.get(url + "/info").json()["num_shards"] == 2
        body = {
            "inputs": "The quick brown fox",
            "parameters": {"max_new_tokens": 8, "details": True, "ignore_eos": True},
        }
        reply = httpx.post(url + "/generate", json=body, timeout=120).json()
        ids = [t["id"] for t in reply["details"]["tokens"]]
        expected, _ = _single(tiny_model_dir, ["The quick brown fox"], 8)
        assert ids == expected[0]
        assert "the router runs on node 0" in (tmp_path / "node1.log").read_text()
        assert _health_code(f"127.0.0.1:{grpc_base + 1}", None) == "UNAUTHENTICATED"
        assert _health_code(f"127.0.0.1:{grpc_base + 1}", "guess") == "UNAUTHENTICATED"
        assert _health_code(f"127.0.0.1:{grpc_base + 1}", "group-secret") == "OK"
    finally:
        for proc in (node0, node1):
            proc.terminate()
        for proc in (node0, node1):
            proc.wait(timeout=60)


def _health_code(address: str, secret: str | None) -> str:
    """The status of a Health call to a shard's TCP port with this secret."""
    import grpc

    from common.pb import pb, pb_grpc
    from common.rpc import secret_metadata

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)
        try:
            stub.Health(pb.HealthRequest(), timeout=10, metadata=secret_metadata(secret))
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"
