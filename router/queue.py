"""The waiting queue: FIFO admission under the prefill token budget and the free blocks."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from common.allocator import BlockAllocator
from router.entry import Entry, State


@dataclass(slots=True)
class Admitted:
    entry: Entry
    chunk_len: int | None  # prompt tokens per forward while prefilling; None: all at once


class RequestQueue:
    def __init__(self) -> None:
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        self._entries.append(entry)

    def drop_cancelled(self) -> list[Entry]:
        """Removes cancelled entries (they hold no blocks); returns them."""
        dropped = [e for e in self._entries if e.is_cancelled]
        if dropped:
            self._entries = deque(e for e in self._entries if not e.is_cancelled)
        return dropped

    def drain(self) -> list[Entry]:
        entries, self._entries = list(self._entries), deque()
        return entries

    def next_batch(
        self,
        allocator: BlockAllocator,
        prefill_budget: int,
        token_budget: int,
        min_size: int | None = None,
        max_size: int | None = None,
        allow_chunking: bool = False,
    ) -> list[Admitted] | None:
        """Takes entries from the front while they fit: prompt tokens within
        `prefill_budget` (the last one chunked when `allow_chunking`), prompt + new tokens
        within `token_budget`, blocks free. Order is kept: the first entry that does not
        fit stops admission. Returns None (and takes nothing) when fewer than `min_size`
        entries fit."""
        self.drop_cancelled()
        admitted: list[Admitted] = []
        prefill_tokens = total_tokens = 0
        while self._entries:
            if max_size is not None and len(admitted) >= max_size:
                break
            entry = self._entries[0]
            prefix = allocator.lookup(entry.input_ids)
            cache_len = len(prefix) * allocator.block_size
            to_compute = entry.input_length - cache_len
            room = prefill_budget - prefill_tokens
            chunk_len = None
            if to_compute > room:
                if not allow_chunking or room <= 0:
                    break
                chunk_len = room
            if total_tokens + entry.max_total_tokens > token_budget:
                break
            blocks = allocator.allocate(entry.max_total_tokens, prefix)
            if blocks is None:
                break
            self._entries.popleft()
            entry.blocks, entry.state, entry.cache_len = blocks, State.RUNNING, cache_len
            admitted.append(Admitted(entry, chunk_len))
            prefill_tokens += chunk_len or to_compute
            total_tokens += entry.max_total_tokens
            if chunk_len is not None:
                break
        if not admitted or (min_size is not None and len(admitted) < min_size):
            self._put_back(admitted, allocator)
            return None
        return admitted

    def _put_back(self, admitted: list[Admitted], allocator: BlockAllocator) -> None:
        for item in reversed(admitted):
            allocator.free(item.entry.blocks)
            item.entry.blocks, item.entry.state, item.entry.cache_len = [], State.WAITING, 0
            self._entries.appendleft(item.entry)
