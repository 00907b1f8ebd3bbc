"""The one place where integers become tensors for a forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.attention import AttentionInputs
from shard.batch import RequestState


@dataclass(slots=True)
class ForwardInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64 rotary indices: positions (see long_after)
    attention: AttentionInputs


def prepare_forward(
    requests: list[RequestState], block_size: int, device: torch.device, long_after: int = 0
) -> ForwardInputs:
    """Lays out the next tokens of `requests` (none finished) one request after another.

    `long_after` > 0 (longrope): a request longer than that (its prompt, or prompt and
    tokens so far) has its positions moved up by it, to the rotary tables' long rows."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts, query_lens, cache_lens = [], [], []
    for request in requests:
        start, count = request.num_computed, request.query_len
        starts.append(len(ids))
        query_lens.append(count)
        cache_lens.append(start)
        ids.extend(request.all_ids[start : start + count])
        rotary = long_after if long_after and len(request.all_ids) > long_after else 0
        positions.extend(range(rotary + start, rotary + start + count))
        blocks = request.blocks
        slots.extend(
            blocks[p // block_size] * block_size + p % block_size
            for p in range(start, start + count)
        )
    max_blocks = max(len(r.blocks) for r in requests)
    table = [r.blocks + [0] * (max_blocks - len(r.blocks)) for r in requests]
    attention = AttentionInputs(
        query_starts=starts,
        query_lens=query_lens,
        cache_lens=cache_lens,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(table, dtype=torch.int64, device=device),
        block_size=block_size,
    )
    return ForwardInputs(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        attention=attention,
    )
