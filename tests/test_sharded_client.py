"""The router's fan-out to the shards: a call ends only when every rank has answered."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from router.client import ShardedClient


class _Rank:
    """A stub for one rank: `ClearCache` answers after `delay` seconds, or fails at once."""

    def __init__(self, delay: float, fails: bool, log: list) -> None:
        self.delay, self.fails, self.log = delay, fails, log

    async def ClearCache(self, message, **options):  # noqa: N802 - the gRPC method's name
        if self.fails:
            self.log.append("failed")
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None, "rank 0 broke")
        await asyncio.sleep(self.delay)
        self.log.append("slow rank done")
        return object()


async def test_a_failure_on_one_rank_is_raised_only_after_the_other_ranks_answer():
    client = ShardedClient(["unix:/nowhere-0", "unix:/nowhere-1"])
    log: list[str] = []
    client._stubs = [_Rank(0.0, True, log), _Rank(0.2, False, log)]
    with pytest.raises(grpc.aio.AioRpcError, match="rank 0 broke"):
        await client.clear_cache(None)
    # Raising on rank 0's error at once would let the next call reach rank 1 before this one.
    assert log == ["failed", "slow rank done"]
    await client.close()


async def test_replies_come_back_in_rank_order():
    client = ShardedClient(["unix:/nowhere-0", "unix:/nowhere-1"])
    answers = []

    class _Answer:
        def __init__(self, rank: int, delay: float) -> None:
            self.rank, self.delay = rank, delay

        async def Health(self, message, **options):  # noqa: N802
            await asyncio.sleep(self.delay)
            answers.append(self.rank)
            return self.rank

    client._stubs = [_Answer(0, 0.1), _Answer(1, 0.0)]
    assert await client._all("Health", None) == [0, 1]
    assert answers == [1, 0]
    await client.close()
