"""Continuous batching against a fake shard: budgets, order, joins, leaves, cancels, faults."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from common.allocator import BlockAllocator
from router.entry import Entry, Failure
from router.scheduler import BatchingConfig, Scheduler
from router.types import Params
from tests.fake_shard import FakeShard

_ids = itertools.count(1)


def entry(prompt: int, max_new: int) -> Entry:
    return Entry(
        id=next(_ids),
        inputs=" ".join(["w"] * prompt),
        input_length=prompt,
        params=Params(max_new_tokens=max_new),
    )


def make(num_blocks=100, prefill=64, total=10_000, chunking=True, **kw):
    shard = FakeShard()
    config = BatchingConfig(
        max_batch_prefill_tokens=prefill,
        max_batch_total_tokens=total,
        support_chunking=chunking,
        **kw,
    )
    return shard, Scheduler(shard, BlockAllocator(num_blocks, 16), config)


async def drain(entry: Entry) -> list:
    events = []
    while True:
        event = await asyncio.wait_for(entry.events.get(), 10)
        events.append(event)
        if isinstance(event, Failure) or event.finished is not None:
            return events


async def run_all(scheduler: Scheduler, entries: list[Entry], delay_steps: dict | None = None):
    task = asyncio.ensure_future(scheduler.run())
    try:
        for e in entries:
            scheduler.submit(e)
        return await asyncio.gather(*(drain(e) for e in entries))
    finally:
        task.cancel()


@pytest.mark.parametrize("chunking", [True, False])
async def test_everyone_finishes_in_order_and_blocks_return(chunking):
    shard, scheduler = make(chunking=chunking)
    entries = [entry(10 + i, 3 + i % 4) for i in range(12)]
    results = await run_all(scheduler, entries)
    for e, events in zip(entries, results, strict=True):
        assert events[-1].finished.generated_tokens == e.params.max_new_tokens
        assert [g.tokens[0].id for g in events] == list(range(1, e.params.max_new_tokens + 1))
    assert scheduler.allocator.num_free == 100 and not scheduler.running
    first_prefill = shard.forwards[0]["ids"]
    assert first_prefill == sorted(first_prefill)  # FIFO admission


async def test_prefill_budget_respected_and_long_prompt_chunked():
    shard, scheduler = make(prefill=32)
    entries = [entry(20, 4), entry(100, 2), entry(5, 2)]
    await run_all(scheduler, entries)
    assert max(f["tokens"] for f in shard.forwards) <= 32
    # the 100-token prompt was computed over several forwards while request 1 decoded
    assert sum(1 for f in shard.forwards if entries[1].id in f["ids"]) >= 4


async def test_requests_join_a_running_batch():
    shard, scheduler = make()
    first = entry(10, 30)
    task = asyncio.ensure_future(scheduler.run())
    try:
        scheduler.submit(first)
        for _ in range(3):
            await first.events.get()
        late = entry(10, 2)
        scheduler.submit(late)
        await drain(late)
        await drain(first)
        assert any(first.id in f["ids"] and late.id in f["ids"] for f in shard.forwards)
        assert "filter_batch" in shard.calls  # late left the batch before first finished
    finally:
        task.cancel()


async def test_kv_blocks_limit_admission_and_order_is_kept():
    shard, scheduler = make(num_blocks=4)  # 64 tokens
    a, b, c = entry(30, 20), entry(30, 20), entry(5, 2)  # a and b need 4 blocks each
    results = await run_all(scheduler, [a, b, c])
    assert all(r[-1].finished for r in results)
    # b waited for a's blocks; c (which would fit) did not jump ahead of b
    first_b = next(i for i, f in enumerate(shard.forwards) if b.id in f["ids"])
    first_c = next(i for i, f in enumerate(shard.forwards) if c.id in f["ids"])
    assert first_b <= first_c
    assert scheduler.allocator.num_free == 4


async def test_cancelled_request_frees_blocks_within_a_step():
    shard, scheduler = make()
    keep, gone = entry(10, 40), entry(10, 1000)
    task = asyncio.ensure_future(scheduler.run())
    try:
        scheduler.submit(keep)
        scheduler.submit(gone)
        await gone.events.get()
        gone.cancel()
        scheduler.wake()
        await asyncio.sleep(0.05)
        assert gone.id not in scheduler.running
        assert scheduler.allocator.num_held == len(keep.blocks)
        events = await drain(keep)
        assert events[-1].finished.generated_tokens == 40
        assert scheduler.allocator.num_free == 100
    finally:
        task.cancel()


async def test_cancelled_while_waiting_never_runs():
    shard, scheduler = make(num_blocks=2)
    running, waiting = entry(10, 10), entry(10, 10)
    task = asyncio.ensure_future(scheduler.run())
    try:
        scheduler.submit(running)
        scheduler.submit(waiting)  # does not fit next to `running`
        waiting.cancel()
        await drain(running)
        await asyncio.sleep(0.05)
        assert all(waiting.id not in f["ids"] for f in shard.forwards)
        assert isinstance(await asyncio.wait_for(waiting.events.get(), 5), Failure)
    finally:
        task.cancel()


@pytest.mark.parametrize("method", ["decode", "prefill"])
async def test_failing_shard_call_fails_only_its_batch(method, caplog):
    shard, scheduler = make()
    shard.fail_on.add(method)
    victims = [entry(10, 5), entry(12, 5)]
    results = await run_all(scheduler, victims)
    for events in results:
        assert isinstance(events[-1], Failure) and events[-1].status == 424
        assert "injected" not in events[-1].message  # the shard's words go to the log
    assert f"injected {method} failure" in caplog.text
    assert scheduler.allocator.num_free == 100 and not scheduler.running
    later = entry(10, 3)
    [events] = await run_all(scheduler, [later])
    assert events[-1].finished.generated_tokens == 3


async def test_without_chunking_a_failed_prefill_spares_the_running_batch():
    shard, scheduler = make(chunking=False, max_waiting_tokens=1)
    running = entry(10, 20)
    task = asyncio.ensure_future(scheduler.run())
    try:
        scheduler.submit(running)
        await running.events.get()
        shard.fail_on.add("prefill")
        newcomer = entry(10, 3)
        scheduler.submit(newcomer)
        assert isinstance((await drain(newcomer))[-1], Failure)
        assert (await drain(running))[-1].finished.generated_tokens == 20
    finally:
        task.cancel()


async def test_max_batch_size_without_chunking():
    shard, scheduler = make(chunking=False, max_batch_size=2)
    await run_all(scheduler, [entry(5, 6) for _ in range(5)])
    assert max(len(f["ids"]) for f in shard.forwards) <= 2


async def test_liveness_checks_never_overlap_a_step_and_later_requests_run():
    """/health after a failure asks for a liveness prefill; hammered while requests run, the
    loop stays the only caller: never two batch calls in flight, the order ranks would see
    is one sequence, and every request after the failure completes."""
    shard, scheduler = make()
    shard.fail_on.add("decode")
    task = asyncio.ensure_future(scheduler.run())
    try:
        victims = [entry(10, 5), entry(12, 5)]
        for e in victims:
            scheduler.submit(e)
        await asyncio.gather(*(drain(e) for e in victims))
        later = [entry(8, 30) for _ in range(6)]
        for e in later:
            scheduler.submit(e)
        checks = [scheduler.confirm_liveness() for _ in range(50)]
        results = await asyncio.gather(*(drain(e) for e in later), *checks)
        assert all(events[-1].finished.generated_tokens == 30 for events in results[:6])
        assert all(results[6:]) and scheduler.num_confirmed_failures == 1
        assert shard.max_in_flight == 1
        served = shard.calls.count("liveness_prefill")
        assert served >= 1
        assert await scheduler.confirm_liveness()  # no new failure: no new call
        assert shard.calls.count("liveness_prefill") == served
    finally:
        task.cancel()
