"""Helpers to drive a ShardEngine the way a router would."""

from __future__ import annotations

from common.config import ShardConfig
from shard.batch import RequestSpec
from shard.engine import ShardEngine
from shard.sampling import SamplingParams


def make_engine(
    model_dir, kv_bytes: int = 64 << 20, max_total: int = 1024, **options
) -> ShardEngine:
    engine = ShardEngine(ShardConfig(model_dir=str(model_dir), kv_cache_memory=kv_bytes, **options))
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
