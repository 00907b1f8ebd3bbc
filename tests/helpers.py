"""Helpers to drive a ShardEngine the way a router would."""

from __future__ import annotations

import dataclasses
from typing import Any

from common.allocator import BlockAllocator
from common.config import ShardConfig
from shard.batch import RequestSpec
from shard.engine import ShardEngine
from shard.sampling import SamplingParams


class RoutedEngine:
    """A ShardEngine whose requests get their KV blocks from the router's allocator, as in
    production: a request that names no blocks is given them here before Prefill, and its
    blocks go back once the engine no longer holds the request (finished, filtered, cleared
    or refused). Everything else is the engine's own (attribute access passes through)."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.pool: BlockAllocator | None = None
        self.held: list[tuple[int, list[int]]] = []  # (request id, blocks from self.pool)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def warmup(self, *args, **kwargs):
        result = self.engine.warmup(*args, **kwargs)
        self.held.clear()
        kv = self.engine.runner.kv
        self.pool = BlockAllocator(kv.num_blocks - 1, self.engine.block_size)
        return result

    def prefill(self, batch_id: int, specs: list[RequestSpec], cached_batch_id: int | None):
        specs = [s if s.blocks else self._with_blocks(s) for s in specs]
        try:
            return self.engine.prefill(batch_id, specs, cached_batch_id)
        finally:
            self._give_back()

    def decode(self, batch_ids: list[int]):
        try:
            return self.engine.decode(batch_ids)
        finally:
            self._give_back()

    def filter(self, batch_id: int, request_ids: list[int]):
        try:
            return self.engine.filter(batch_id, request_ids)
        finally:
            self._give_back()

    def clear(self, batch_id: int | None) -> None:
        self.engine.clear(batch_id)
        self._give_back()

    def blocks_all_back(self) -> bool:
        """No request holds a block, on either side."""
        assert self.pool is not None
        self.pool.check()
        return self.pool.num_free == self.pool.num_blocks and not self.engine.admission.claims.held

    def _with_blocks(self, spec: RequestSpec) -> RequestSpec:
        """A copy of `spec` naming blocks from the pool (the caller's spec is unchanged)."""
        assert self.pool is not None, "warm the engine up first"
        prompt = len(self.engine.admission.tokenize(spec))
        # the last generated token is never fed back (as the router counts)
        blocks = self.pool.allocate(max(1, prompt + spec.max_new_tokens - 1))
        if blocks is None:  # too long for the pool: the engine's checks say why
            return spec
        self.held.append((spec.id, blocks))
        return dataclasses.replace(spec, blocks=blocks)

    def _give_back(self) -> None:
        """Frees the blocks of requests the engine no longer holds (the oldest holder of an
        id is the live one; a refused duplicate's blocks come back with it)."""
        assert self.pool is not None
        live = {r.id for batch in self.engine.batches.values() for r in batch.requests}
        kept: list[tuple[int, list[int]]] = []
        for request_id, blocks in self.held:
            if request_id in live:
                live.discard(request_id)
                kept.append((request_id, blocks))
            else:
                self.pool.free(blocks)
        self.held = kept


def make_engine(model_dir, kv_bytes: int = 64 << 20, max_total: int = 1024, **options) -> Any:
    """A warmed-up engine that allocates blocks as the router does (a RoutedEngine)."""
    engine = RoutedEngine(
        ShardEngine(ShardConfig(model_dir=str(model_dir), kv_cache_memory=kv_bytes, **options))
    )
    engine.warmup([], None, 256, max_total)
    return engine


def spec(request_id: int, text: str, max_new_tokens: int = 8, **options) -> RequestSpec:
    options.setdefault("sampling", SamplingParams())
    options.setdefault("add_special_tokens", False)
    return RequestSpec(id=request_id, inputs=text, max_new_tokens=max_new_tokens, **options)


class Collector:
    """Accumulates tokens and finishes per request over Prefill/Decode results."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.finished: dict = {}
        self.generations: dict[int, list] = {}

    def add(self, result) -> None:
        for g in result.generations:
            self.tokens.setdefault(g.request_id, []).extend(g.tokens.ids)
            self.logprobs.setdefault(g.request_id, []).extend(g.tokens.logprobs)
            self.generations.setdefault(g.request_id, []).append(g)
            if g.finished is not None:
                self.finished[g.request_id] = g.finished


def filter_finished(engine: ShardEngine, batch_info, collector: Collector):
    """FilterBatch away finished requests, as the router does; returns the new batch info."""
    keep = [i for i in batch_info.request_ids if i not in collector.finished]
    if len(keep) != len(batch_info.request_ids):
        return engine.filter(batch_info.id, keep)
    return batch_info


def drive(engine: ShardEngine, collector: Collector, batch) -> None:
    """Decodes `batch` to the end, filtering finished requests away as the router does."""
    while batch is not None:
        batch = filter_finished(engine, batch, collector)
        result = engine.decode([batch.id])
        collector.add(result)
        batch = result.batch


def run_to_end(
    engine: ShardEngine, batch_id: int, specs, collector: Collector | None = None
) -> Collector:
    collector = collector or Collector()
    result = engine.prefill(batch_id, specs, None)
    collector.add(result)
    drive(engine, collector, result.batch)
    return collector
