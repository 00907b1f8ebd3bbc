"""Continuous batching by token budget.

One asyncio task, the loop in `run`, owns the running batch and is the only caller of the
shards' batch RPCs (Prefill, Decode, FilterBatch, ClearCache, the liveness Prefill): every
tensor-parallel rank sees them in one order, so their collectives always match. Other tasks
ask the loop (`confirm_liveness`) instead of calling.

Between steps the loop admits waiting requests (merged into the running batch's forward when
the shards support chunking, else as TGI does with `waiting_served_ratio` and
`max_waiting_tokens`), hands every generation to its request, and removes finished and
cancelled requests with FilterBatch (ClearCache when none is left). A failing shard call
fails only the requests of that batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace

from common.allocator import BlockAllocator
from router.entry import Entry, Failure
from router.queue import Admitted, RequestQueue
from router.types import CachedBatch, ShardRequest, StepOut

log = logging.getLogger("router")
_tracer = trace.get_tracer("pytgi.router")  # batch spans, linked to their requests' spans
GENERATION_FAILED = "Request failed during generation; the server log has the details"
LIVENESS_WAIT_SECONDS = 60.0  # a /health after a failure waits at most this for the loop


class ShardClient(Protocol):
    async def health(self) -> None:
        """Every shard answers (no forward: any task may call it)."""

    async def liveness_prefill(self) -> None:
        """A one-token forward on every shard (the loop's call only)."""

    async def prefill(
        self, batch_id: int, requests: list[ShardRequest], cached: CachedBatch | None
    ) -> StepOut: ...

    async def decode(self, batches: list[CachedBatch]) -> StepOut: ...

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> CachedBatch: ...

    async def clear_cache(self, batch_id: int | None) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    waiting_served_ratio: float = 1.2
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    support_chunking: bool = True


class SchedulerMetrics(Protocol):
    def on_step(self, method: str, step: StepOut, seconds: float) -> None: ...

    def on_step_failure(self, method: str) -> None: ...

    def on_new_batch(self, size: int, joins_running: bool, chunked: bool) -> None: ...

    def on_filter(self, method: str, seconds: float) -> None: ...

    def on_batch(self, batch: CachedBatch | None, queue_size: int) -> None: ...

    def on_blocks(self, free: int, used: int) -> None: ...

    def on_prefix(self, reused_tokens: int) -> None: ...

    def on_evictions(self, total: int) -> None: ...


class Scheduler:
    def __init__(
        self,
        client: ShardClient,
        allocator: BlockAllocator,
        config: BatchingConfig,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.client = client
        self.allocator = allocator
        self.config = config
        self.metrics = metrics
        self._last_method = "prefill"  # the last step's RPC, labelling the filter after it
        self.queue = RequestQueue()
        self.running: dict[int, Entry] = {}  # request id -> entry, for the running batch
        self._wake = asyncio.Event()
        self._batch_ids = itertools.count(1)
        self.num_failed_steps = 0
        self.num_confirmed_failures = 0  # failures after which a liveness prefill succeeded
        self._pending_clears: list[int] = []
        self._liveness_waiters: list[asyncio.Future[bool]] = []  # served by the loop

    # ---- used by the HTTP layer ----
    def submit(self, entry: Entry) -> None:
        self.queue.append(entry)
        self._wake.set()

    def wake(self) -> None:
        """Called after a cancellation, so a sleeping loop drops the request now."""
        self._wake.set()

    # ---- the loop ----
    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._clear_failed()
            await self._serve_liveness()
            self._finish_cancelled_waiting()
            batch = await self._admit()
            waiting_steps = 1
            while batch is not None:
                batch, admitted = await self._next_step(batch, waiting_steps)
                waiting_steps = 1 if admitted else waiting_steps + 1
                if batch is None and len(self.queue):
                    batch = await self._admit()  # requests that waited for room
            self._report(None)

    async def _next_step(
        self, batch: CachedBatch, waiting_steps: int
    ) -> tuple[CachedBatch | None, bool]:
        """One forward over the running batch, with newly admitted requests when they fit."""
        await self._clear_failed()
        await self._serve_liveness()
        kept = await self._drop_gone(batch)
        if kept is None:
            return None, False
        batch = kept
        self._finish_cancelled_waiting()
        cfg = self.config
        token_budget = cfg.max_batch_total_tokens - batch.max_tokens
        if cfg.support_chunking:
            budget = cfg.max_batch_prefill_tokens - batch.current_tokens
            admitted = self.queue.next_batch(
                self.allocator, budget, token_budget, allow_chunking=True
            )
            if admitted:
                return await self._prefill(admitted, batch), True
            return await self._decode([batch]), False
        min_size = None
        if waiting_steps < cfg.max_waiting_tokens:
            min_size = int(batch.size * cfg.waiting_served_ratio)
        max_size = cfg.max_batch_size - batch.size if cfg.max_batch_size else None
        admitted = self.queue.next_batch(
            self.allocator, cfg.max_batch_prefill_tokens, token_budget, min_size, max_size
        )
        batches = [batch]
        if admitted:
            new_batch = await self._prefill(admitted, None)
            if new_batch is not None:
                batches.append(new_batch)
        return await self._decode(batches), bool(admitted)

    async def _admit(self) -> CachedBatch | None:
        cfg = self.config
        admitted = self.queue.next_batch(
            self.allocator,
            cfg.max_batch_prefill_tokens,
            cfg.max_batch_total_tokens,
            max_size=cfg.max_batch_size,
            allow_chunking=cfg.support_chunking,
        )
        if not admitted:
            return None
        return await self._prefill(admitted, None, joins_running=False)

    # ---- shard calls ----
    async def _prefill(
        self, admitted: list[Admitted], cached: CachedBatch | None, joins_running: bool = True
    ) -> CachedBatch | None:
        """Prefill of `admitted`, merged with `cached` when given; `joins_running`: the new
        requests join a running batch (in this call, or in the next Decode's merge).
        Invariant: the shards have dropped every failed batch first, since the blocks its
        requests held may already be the admitted requests'."""
        await self._clear_failed()
        now = time.monotonic()
        requests = []
        for item in admitted:
            entry = item.entry
            entry.started_at = now
            self.running[entry.id] = entry
            requests.append(
                ShardRequest(
                    id=entry.id,
                    inputs=entry.inputs,
                    params=entry.params,
                    blocks=entry.blocks,
                    block_size=self.allocator.block_size,
                    cache_len=entry.cache_len,
                    chunk_len=item.chunk_len,
                    input_ids=entry.input_ids,
                )
            )
        batch_id = next(self._batch_ids)
        involved = [i.entry.id for i in admitted]
        batch_ids = [batch_id]
        if cached is not None:
            involved += cached.request_ids
            batch_ids.append(cached.id)
        if self.metrics:
            chunked = any(item.chunk_len is not None for item in admitted)
            self.metrics.on_new_batch(len(admitted), joins_running, chunked)
        call = self.client.prefill(batch_id, requests, cached)
        return await self._call("prefill", involved, batch_ids, call)

    async def _decode(self, batches: list[CachedBatch]) -> CachedBatch | None:
        involved = [i for b in batches for i in b.request_ids]
        return await self._call(
            "decode", involved, [b.id for b in batches], self.client.decode(batches)
        )

    async def _call(
        self, method: str, involved: list[int], batch_ids: list[int], call
    ) -> CachedBatch | None:
        start = time.monotonic()
        self._last_method = method
        links = [
            trace.Link(e.span_context)
            for i in involved
            if (e := self.running.get(i)) is not None and e.span_context and e.span_context.is_valid
        ]
        try:
            with _tracer.start_as_current_span(method, links=links) as span:
                span.set_attribute("batch_size", len(involved))
                step: StepOut = await call  # the client carries this span's context
        except Exception as exc:  # noqa: BLE001 - any shard failure fails this batch only
            if self.metrics:
                self.metrics.on_step_failure(method)
            self._fail_batch(involved, batch_ids, exc)
            return None
        if self.metrics:
            self.metrics.on_step(method, step, time.monotonic() - start)
        self._refuse(step.refused)
        self._dispatch(step)
        self._report(step.batch)
        return step.batch

    def _refuse(self, refused: dict[int, str]) -> None:
        """Requests the shards would not admit fail alone (422); the batch ran without them."""
        for request_id, message in refused.items():
            entry = self.running.get(request_id)
            if entry is not None:
                log.warning("the shards refused request %d: %s", request_id, message)
                entry.fail(Failure(422, "validation", message))
                self._release(entry)

    def _dispatch(self, step: StepOut) -> None:
        for generation in step.generations:
            entry = self.running.get(generation.request_id)
            if entry is None:
                continue  # cancelled meanwhile; it leaves at the next filter
            if not entry.is_prompt_cached:  # its prompt's K/V now exist: share them
                entry.is_prompt_cached = True
                self.allocator.register(entry.input_ids, entry.blocks)
                if self.metrics:
                    self.metrics.on_prefix(entry.cache_len)
            entry.push(generation)
            if generation.finished is not None:
                self._release(entry)

    async def _drop_gone(self, batch: CachedBatch) -> CachedBatch | None:
        """FilterBatch away finished and cancelled requests; ClearCache when none is left."""
        for request_id in batch.request_ids:
            entry = self.running.get(request_id)
            if entry is not None and entry.is_cancelled:
                entry.fail(Failure(499, "cancelled", "the client disconnected"))
                self._release(entry)
        keep = [i for i in batch.request_ids if i in self.running]
        if len(keep) == batch.size:
            return batch
        try:
            if not keep:
                await self.client.clear_cache(batch.id)
                return None
            start = time.monotonic()
            kept = await self.client.filter_batch(batch.id, keep)
            if self.metrics:  # labelled with the step whose results it filters, as TGI does
                self.metrics.on_filter(self._last_method, time.monotonic() - start)
            return kept
        except Exception as exc:  # noqa: BLE001
            self._fail_batch(keep, [batch.id], exc)
            return None

    async def confirm_liveness(self) -> bool:
        """After a failed step: True once a one-token prefill succeeds on every shard. The
        loop runs that prefill between its steps; this only asks and waits."""
        if self.num_failed_steps == self.num_confirmed_failures:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._liveness_waiters.append(waiter)
        self._wake.set()
        try:  # the loop answers between steps; one that never does is not alive either
            return await asyncio.wait_for(asyncio.shield(waiter), LIVENESS_WAIT_SECONDS)
        except TimeoutError:
            return False

    async def _serve_liveness(self) -> None:
        """Answers every waiting `confirm_liveness` with one liveness prefill."""
        if not self._liveness_waiters:
            return
        waiters, self._liveness_waiters = self._liveness_waiters, []
        failures = self.num_failed_steps
        try:
            await self.client.liveness_prefill()
            self.num_confirmed_failures = failures
            alive = True
        except Exception as exc:  # noqa: BLE001
            log.warning("liveness prefill failed: %s", _describe(exc))
            alive = False
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(alive)

    # ---- bookkeeping ----
    def _release(self, entry: Entry) -> None:
        self.running.pop(entry.id, None)
        if entry.blocks:
            self.allocator.free(entry.blocks)
            entry.blocks = []

    def _fail_batch(self, request_ids: list[int], batch_ids: list[int], exc: Exception) -> None:
        """The shards' own words go to the log only: they may name internals (paths,
        exceptions) that are not the clients' business."""
        self.num_failed_steps += 1
        log.error("shard call failed, failing %d requests: %s", len(request_ids), _describe(exc))
        for request_id in request_ids:
            entry = self.running.get(request_id)
            if entry is not None:
                entry.fail(Failure(424, "generation", GENERATION_FAILED))
                self._release(entry)
        self._pending_clears.extend(batch_ids)

    async def _clear_failed(self) -> None:
        """Drops the shards' state of failed batches (their requests were answered)."""
        while self._pending_clears:
            batch_id = self._pending_clears.pop()
            try:
                await self.client.clear_cache(batch_id)
            except Exception as exc:  # noqa: BLE001
                log.warning(
                    "ClearCache(%d) after a failure also failed: %s", batch_id, _describe(exc)
                )

    def _finish_cancelled_waiting(self) -> None:
        for entry in self.queue.drop_cancelled():
            entry.fail(Failure(499, "cancelled", "the client disconnected"))

    def _report(self, batch: CachedBatch | None) -> None:
        if self.metrics:
            self.metrics.on_batch(batch, len(self.queue))
            self.metrics.on_blocks(self.allocator.num_free, self.allocator.num_held)
            self.metrics.on_evictions(self.allocator.num_evictions)


def _describe(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        text = details()
        if text:
            return str(text)
    return str(exc) or type(exc).__name__
