"""A pure-Python stand-in for the sharded gRPC client, with the shard's batch semantics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from router.types import CachedBatch, FinishedOut, GenerationOut, ShardRequest, StepOut, TokenOut


@dataclass
class _Req:
    id: int
    prompt_len: int
    max_new: int
    chunk_len: int | None
    blocks: list[int]
    computed: int = 0
    generated: int = 0

    @property
    def done(self) -> bool:
        return self.generated >= self.max_new

    @property
    def step_tokens(self) -> int:
        if self.done:
            return 0
        if self.computed < self.prompt_len:
            remaining = self.prompt_len - self.computed
            return min(self.chunk_len or remaining, remaining)
        return 1


@dataclass
class FakeShard:
    block_size: int = 16
    batches: dict[int, list[_Req]] = field(default_factory=dict)
    forwards: list[dict] = field(default_factory=list)  # per forward: tokens, request ids
    fail_on: set[str] = field(default_factory=set)  # methods that raise once
    calls: list[str] = field(default_factory=list)
    requests: list[ShardRequest] = field(default_factory=list)  # every request prefilled
    in_flight: int = 0  # batch calls running now; above 1, ranks could see two orders
    max_in_flight: int = 0

    async def _enter(self, method: str) -> None:
        """Yields to the event loop, as a real RPC does, then fails if told to."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
        finally:
            self.in_flight -= 1
        self.calls.append(method)
        if method in self.fail_on:
            self.fail_on.discard(method)
            raise RuntimeError(f"injected {method} failure")

    def _info(self, batch_id: int) -> CachedBatch:
        reqs = self.batches[batch_id]
        return CachedBatch(
            batch_id,
            tuple(r.id for r in reqs),
            sum(len(r.blocks) for r in reqs) * self.block_size,
            sum(r.step_tokens for r in reqs),
        )

    def _step(self, batch_id: int) -> StepOut:
        reqs = self.batches[batch_id]
        live = [r for r in reqs if not r.done]
        self.forwards.append(
            {"tokens": sum(r.step_tokens for r in live), "ids": [r.id for r in live]}
        )
        generations = []
        for r in live:
            r.computed += r.step_tokens
            if r.computed < r.prompt_len:
                continue
            r.generated += 1
            g = GenerationOut(r.id, [TokenOut(r.generated, -0.5, f" t{r.generated}", False)])
            if r.done:
                text = "".join(f" t{i}" for i in range(1, r.generated + 1))
                g.finished = FinishedOut(text, r.generated, "length", None)
            generations.append(g)
        if all(r.done for r in reqs):
            del self.batches[batch_id]
            return StepOut(generations, None)
        return StepOut(generations, self._info(batch_id))

    async def prefill(
        self, batch_id: int, requests: list[ShardRequest], cached: CachedBatch | None
    ) -> StepOut:
        await self._enter("prefill")
        self.requests.extend(requests)
        new = [
            _Req(r.id, len(r.inputs.split()), r.params.max_new_tokens, r.chunk_len, list(r.blocks))
            for r in requests
        ]
        for r in requests:
            assert r.blocks and 0 not in r.blocks
        if cached is not None:
            self.batches[cached.id].extend(new)
            return self._step(cached.id)
        self.batches[batch_id] = new
        return self._step(batch_id)

    async def decode(self, batches: list[CachedBatch]) -> StepOut:
        await self._enter("decode")
        first = batches[0].id
        for other in batches[1:]:
            self.batches[first].extend(self.batches.pop(other.id))
        return self._step(first)

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> CachedBatch:
        await self._enter("filter_batch")
        keep = set(request_ids)
        self.batches[batch_id] = [r for r in self.batches[batch_id] if r.id in keep]
        return self._info(batch_id)

    async def health(self) -> None:
        await asyncio.sleep(0.001)  # no forward: any task may call it

    async def liveness_prefill(self) -> None:
        await self._enter("liveness_prefill")

    async def clear_cache(self, batch_id: int | None) -> None:
        await self._enter("clear_cache")
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)
