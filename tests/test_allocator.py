"""The block allocator's invariants over thousands of random steps."""

from __future__ import annotations

import random

import pytest

from common.allocator import BlockAllocator


def test_randomized_invariants():
    rng = random.Random(0)
    allocator = BlockAllocator(num_blocks=200, block_size=16)
    held: list[list[int]] = []
    for _ in range(20_000):
        if held and rng.random() < 0.45:
            allocator.free(held.pop(rng.randrange(len(held))))
        else:
            blocks = allocator.allocate(rng.randint(1, 400))
            if blocks is not None:
                held.append(blocks)
        flat = [b for blocks in held for b in blocks]
        assert len(flat) == len(set(flat)), "a block is held twice"
        assert 0 not in flat, "block 0 was handed out"
        assert allocator.num_free + allocator.num_held == 200
        assert allocator.num_held == len(flat)
    for blocks in held:
        allocator.free(blocks)
    assert allocator.num_free == 200


def test_allocation_is_all_or_nothing():
    allocator = BlockAllocator(num_blocks=4, block_size=16)
    assert allocator.allocate(16 * 5) is None
    assert allocator.num_free == 4
    assert allocator.allocate(17) == [1, 2]


def test_double_free_raises():
    allocator = BlockAllocator(num_blocks=4, block_size=16)
    blocks = allocator.allocate(16)
    allocator.free(blocks)
    with pytest.raises(ValueError, match="not held"):
        allocator.free(blocks)


def test_freed_runs_are_handed_out_in_ascending_order_again():
    """A request's blocks in ascending order lie in memory as attention reads its keys; the
    free list gives a freed run back in that order, not reversed."""
    allocator = BlockAllocator(num_blocks=64, block_size=16)
    first, second = allocator.allocate(16 * 8), allocator.allocate(16 * 8)
    assert first == list(range(1, 9)) and second == list(range(9, 17))
    allocator.free(second)
    allocator.free(first)
    assert allocator.allocate(16 * 8) == list(range(1, 9))
    assert allocator.allocate(16 * 8) == list(range(9, 17))
    assert allocator.allocate(16 * 3) == [17, 18, 19]


def test_a_bad_free_keeps_the_blocks_freed_before_it():
    allocator = BlockAllocator(num_blocks=8, block_size=16)
    blocks = allocator.allocate(16 * 3)
    with pytest.raises(ValueError, match="not held"):
        allocator.free([blocks[0], blocks[1], 7])
    assert allocator.num_free == 7 and allocator.num_held == 1
    allocator.check()
