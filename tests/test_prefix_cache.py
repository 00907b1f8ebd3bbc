"""Prefix caching: allocator invariants over 10,000 random steps, scheduler behaviour, and
identical greedy outputs with the cache on and off (real processes)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from common.allocator import BlockAllocator
from tests.conftest import Server


def test_randomized_allocate_free_reuse_evict():
    rng = random.Random(1)
    bs = 4
    allocator = BlockAllocator(num_blocks=60, block_size=bs, prefix_caching=True)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    live: list[tuple[list[int], list[int], bool]] = []  # (tokens, blocks, registered)
    hits = 0
    for _ in range(10_000):
        action = rng.random()
        if live and action < 0.35:
            tokens, blocks, _ = live.pop(rng.randrange(len(live)))
            allocator.free(blocks)
        elif live and action < 0.55:
            index = rng.randrange(len(live))
            tokens, blocks, registered = live[index]
            if not registered:
                allocator.register(tokens, blocks)
                live[index] = (tokens, blocks, True)
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 12))]
            prefix = allocator.lookup(tokens)
            assert len(prefix) * bs < len(tokens)  # at least one token is computed
            blocks = allocator.allocate(len(tokens) + rng.randint(1, 8), prefix)
            if blocks is not None:
                hits += bool(prefix)
                assert blocks[: len(prefix)] == prefix
                live.append((tokens, blocks, False))
        allocator.check()
        held = [b for _, blocks, _ in live for b in blocks]
        shared = {b for b in held if held.count(b) > 1}
        assert all(b in allocator._hash_of for b in shared), "a private block is held twice"
        assert 0 not in held
    assert hits > 100  # the cache was exercised
    for _, blocks, _ in live:
        allocator.free(blocks)
    allocator.check()
    assert allocator.num_free == 60


def test_lookup_matches_full_blocks_only_and_verifies_tokens():
    allocator = BlockAllocator(num_blocks=10, block_size=4, prefix_caching=True)
    tokens = list(range(10))
    blocks = allocator.allocate(12)
    allocator.register(tokens, blocks)
    assert allocator.lookup(tokens) == blocks[:2]  # 10 tokens: 2 full blocks, 1 token to compute
    assert allocator.lookup(list(range(9))) == blocks[:2]
    assert allocator.lookup(list(range(8))) == blocks[:1]  # whole-prompt hit keeps one to compute
    assert allocator.lookup([0, 1, 2, 99, 4, 5, 6, 7, 8]) == []
    allocator.free(blocks)
    assert allocator.num_free == 10 and allocator.num_cached == 2  # cached blocks stay until needed
    everything = allocator.allocate(40)  # needs every block: evicts the cached ones
    assert everything is not None and allocator.num_cached == 0
    assert allocator.lookup(tokens) == []


def test_unregistered_blocks_are_never_shared():
    allocator = BlockAllocator(num_blocks=10, block_size=4, prefix_caching=True)
    tokens = list(range(9))
    allocator.allocate(12)  # admitted, then cancelled before its prefill: never registered
    assert allocator.lookup(tokens) == []


def test_disabled_cache_never_hits():
    allocator = BlockAllocator(num_blocks=10, block_size=4, prefix_caching=False)
    blocks = allocator.allocate(12)
    allocator.register(list(range(9)), blocks)
    assert allocator.lookup(list(range(9))) == []


SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 6


def _workload() -> list[str]:
    rng = random.Random(3)
    questions = [
        "What is the sea?",
        "Name a bird.",
        "Why is the sky blue?",
        "Count to three.",
        "Say hi.",
    ]
    prompts = [SYSTEM + q for q in questions]
    prompts += [SYSTEM[: 37 + 13 * i] + " and then" for i in range(4)]  # prefixes ending mid-block
    prompts += [prompts[0], prompts[0]]  # whole-prompt hits
    prompts += [
        " ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(100)) for _ in range(12)
    ]
    return prompts


def _run(server: Server, prompts: list[str], concurrent: bool) -> list[str]:
    async def one(client, prompt):
        reply = await client.post(
            "/generate",
            json={"inputs": prompt, "parameters": {"max_new_tokens": 12, "ignore_eos": True}},
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["generated_text"]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            if concurrent:
                return list(await asyncio.gather(*(one(client, p) for p in prompts)))
            return [await one(client, p) for p in prompts]

    return asyncio.run(go())


@pytest.mark.parametrize("kv_memory", ["64MiB", "512KiB"])  # 512 KiB: 63 blocks, evictions
def test_outputs_identical_with_cache_on_and_off(smollm_dir, tiny_model_dir, tmp_path, kv_memory):
    prompts = _workload()
    limits = [
        "--max-total-tokens",
        "512",
        "--max-input-tokens",
        "400",
        "--max-batch-prefill-tokens",
        "128",
    ]
    results = {}
    for caching in ("--prefix-caching", "--no-prefix-caching"):
        workdir = tmp_path / caching.strip("-")
        workdir.mkdir()
        srv = Server(
            tiny_model_dir,
            workdir,
            router_args=[*limits, caching],
            shard_args=["--kv-cache-memory", kv_memory],
        )
        try:
            results[caching] = _run(srv, prompts, concurrent=False) + _run(
                srv, prompts, concurrent=True
            )
            hits = srv.metric("pytgi_prefix_cache_hits")
            reused = srv.metric("pytgi_prefix_cache_tokens_reused")
            assert (hits > 0 and reused > 0) if caching == "--prefix-caching" else hits == 0
            if caching == "--prefix-caching" and kv_memory == "512KiB":
                assert srv.metric("pytgi_prefix_cache_evictions") > 0
        finally:
            srv.stop()
    assert results["--prefix-caching"] == results["--no-prefix-caching"]
