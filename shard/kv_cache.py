"""The paged KV cache: per layer, K and V pools of fixed-size blocks.

Invariant: block 0 is never given to a real request (it pads gathers and serves liveness
checks); the router (or the shard, for self-numbered requests) owns which block is whose.
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V pools, each per layer `[num_blocks, block_size, num_kv_heads, head_dim]`."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def nbytes(self) -> int:
        """Bytes of every K and V pool."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def capacity_tokens(self) -> int:
        """Tokens storable in all blocks but block 0."""
        return (self.num_blocks - 1) * self.block_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]
