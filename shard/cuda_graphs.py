"""Decode forwards captured as CUDA graphs, one per padded batch size.

A batch of n decoding requests replays the graph of the smallest captured size >= n; rows
n.. are padding: token 0 at position 0, KV slot -1 (nothing written), context 1 (reads
slot 0 of block 0, which no request owns). Larger batches and any forward with a prefill
run eagerly. Every input lives in static buffers that replays read, so the attention
backend must build decode metadata from tensors alone (`decode_metadata`, Triton backends).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from shard.inputs import ForwardInputs

log = logging.getLogger("shard")


def graph_batch_size(num_rows: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest captured size that holds `num_rows`; None when none does (run eagerly)."""
    for size in sizes:
        if size >= num_rows:
            return size
    return None


class Graph(Protocol):
    def replay(self) -> torch.Tensor: ...


class CudaGraph:
    """`fn` captured once; replay reruns its kernels on the same buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile kernels and settle the allocator first
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class EagerGraph:
    """Stands in for a CUDA graph off the GPU (tests): runs `fn` on the static buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class DecodeGraphs:
    """Static decode inputs of the largest size, and one graph per size over their prefixes."""

    def __init__(
        self, runner, sizes: tuple[int, ...], max_total_tokens: int, factory: type = CudaGraph
    ) -> None:
        """`runner`: the ModelRunner whose model and KV pool the graphs read."""
        assert sizes and runner.backend.supports_cuda_graphs, "needs a graph-capable backend"
        self.runner, self.sizes, self.factory = runner, sizes, factory
        largest, device = sizes[-1], runner.device
        max_blocks = -(-max_total_tokens // runner.block_size)
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)  # [B]
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)  # [B]
        self.slots = torch.full((largest,), -1, dtype=torch.int64, device=device)  # [B]
        self.tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        self.context = torch.ones(largest, dtype=torch.int32, device=device)  # [B]
        self.graphs: dict[int, Graph] = {}

    def capture(self) -> None:
        """Largest first, so smaller graphs reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle() if self.factory is CudaGraph else None
        for size in reversed(self.sizes):
            self.graphs[size] = self.factory(self._forward_fn(size), pool)
        log.info("decode graphs captured for batch sizes %s", ",".join(map(str, self.sizes)))

    def _forward_fn(self, size: int) -> Callable[[], torch.Tensor]:
        runner = self.runner
        meta = runner.backend.decode_metadata(
            self.slots[:size], self.tables[:size], self.context[:size]
        )

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return runner.model.forward(
                    self.input_ids[:size], self.positions[:size], meta, runner.kv, runner.backend
                )

        return forward

    def run(self, inputs: ForwardInputs) -> torch.Tensor | None:
        """hidden [n, hidden] of an all-decode forward, or None when no graph fits it."""
        n = inputs.input_ids.shape[0]
        size = graph_batch_size(n, self.sizes)
        tables = inputs.attention.block_tables
        if size is None or tables.shape[1] > self.tables.shape[1]:
            return None
        context = torch.tensor(inputs.attention.context_lens, dtype=torch.int32)
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slots[:n].copy_(inputs.attention.slot_mapping)
        self.tables[:n, : tables.shape[1]].copy_(tables)
        self.context[:n].copy_(context)
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slots[n:size].fill_(-1)
        self.tables[n:size, 0].zero_()
        self.context[n:size].fill_(1)
        return self.graphs[size].replay()[:n]
