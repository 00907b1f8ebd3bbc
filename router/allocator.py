"""The KV block allocator: plain integers, no I/O.

Invariants (checked by randomized tests): block 0 is never handed out; no block is held
twice; free + held == total at every step.
"""

from __future__ import annotations


class BlockAllocator:
    """Hands out block ids 1..num_blocks; a request holds its blocks until it frees them."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks, 0, -1))  # pop() hands out low ids first
        self._held: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` tokens, or None (nothing taken) when too few are free."""
        count = self.blocks_for(num_tokens)
        if count > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(count)]
        self._held.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Returns blocks; freeing a block not held is a bug and raises."""
        for block in blocks:
            if block not in self._held:
                raise ValueError(f"block {block} is not held")
            self._held.remove(block)
            self._free.append(block)
