"""Which live request holds each KV block: so the shard can refuse a request whose blocks
would overwrite another live request's K/V. The router owns the pool and numbers the blocks;
this is only the shard's check that two parties never write one block (no torch here).

A request writes the blocks from its first uncomputed position on (`num_computed //
block_size`); the blocks before that are read-only, and only those may be shared (a cached
prompt prefix). Invariants: a block a new request will write is held by no live request; a
block it only reads is written by no live request."""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol


class Holder(Protocol):
    id: int
    blocks: list[int]
    num_computed: int


class BlockClaims:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        # block -> (holder, the block's index in the holder's blocks)
        self._holders: defaultdict[int, list[tuple[Holder, int]]] = defaultdict(list)

    def add(self, request: Holder) -> None:
        for index, block in enumerate(request.blocks):
            self._holders[block].append((request, index))

    def remove(self, request: Holder) -> None:
        for block in request.blocks:
            holders = [h for h in self._holders[block] if h[0] is not request]
            if holders:
                self._holders[block] = holders
            else:
                del self._holders[block]

    def conflict(self, blocks: list[int], cache_len: int) -> str | None:
        """Why a new request with these blocks (its first `cache_len` tokens already in
        them) would clash with a live one; None when it would not."""
        first_write = cache_len // self.block_size
        for block in blocks[first_write:]:
            if block in self._holders:
                return f"KV block {block} is held by live request {self._holders[block][0][0].id}"
        for block in blocks[:first_write]:
            for holder, index in self._holders.get(block, ()):
                if index >= holder.num_computed // self.block_size:
                    return f"KV block {block} is still being written by request {holder.id}"
        return None

    @property
    def held(self) -> set[int]:
        return set(self._holders)
