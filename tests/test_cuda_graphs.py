"""CUDA-graph decode: batch-size parsing and selection, padding of the static inputs, and
the whole replay path on CPU (EagerGraph stands in for torch.cuda.CUDAGraph)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.config import parse_batch_sizes
from shard.cuda_graphs import DecodeGraphs, EagerGraph, graph_batch_size
from tests.helpers import make_engine, run_to_end, spec

pytest.importorskip("triton")


@pytest.mark.parametrize(
    "text,sizes",
    [("1,2,4", (1, 2, 4)), ("8, 1,2,2", (1, 2, 8)), ("0", ()), ("", ()), ("32", (32,))],
)
def test_parse_batch_sizes(text, sizes):
    assert parse_batch_sizes(text) == sizes


@pytest.mark.parametrize("text", ["a", "1,-2", "0,4", "1.5"])
def test_parse_batch_sizes_rejects(text):
    with pytest.raises(ValueError, match="--cuda-graphs"):
        parse_batch_sizes(text)


@pytest.mark.parametrize(
    "rows,expected", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, None)]
)
def test_graph_batch_size_picks_smallest_that_fits(rows, expected):
    assert graph_batch_size(rows, (1, 2, 4, 8)) == expected


class CountingGraph(EagerGraph):
    replays: list[int] = []

    def __init__(self, fn, pool) -> None:
        super().__init__(fn, pool)

    def replay(self):
        out = super().replay()
        CountingGraph.replays.append(out.shape[0])
        return out


PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello",
    "In a hole in the ground there lived a hobbit.",
    "1 2 3 4 5 6 7 8 9 10",
    "Once upon a time",
]


def test_graph_replay_gives_the_eager_tokens_and_pads(tiny_model_dir):
    eager = make_engine(tiny_model_dir, attention="triton")
    graphed = make_engine(tiny_model_dir, attention="triton")
    graphed.runner.graphs = DecodeGraphs(graphed.runner, (1, 2, 4), 1024, factory=CountingGraph)
    graphed.runner.graphs.capture()
    CountingGraph.replays.clear()
    for count in (1, 3, 5):  # one graph exactly, a padded graph, too many for any graph
        specs = [spec(i, p, 5 + i, ignore_eos=True) for i, p in enumerate(PROMPTS[:count])]
        expected = run_to_end(eager, 1, specs).tokens
        specs = [spec(i, p, 5 + i, ignore_eos=True) for i, p in enumerate(PROMPTS[:count])]
        assert run_to_end(graphed, 1, specs).tokens == expected
    # replays ran at padded sizes: 3 rows in the size-4 graph, never the 5-row batches
    assert CountingGraph.replays and set(CountingGraph.replays) <= {1, 2, 4}
    assert 4 in CountingGraph.replays
    graphs = graphed.runner.graphs
    assert graphs.slots[3:].tolist() == [-1] and graphs.context[3:].tolist() == [1]
    assert not graphed.batches and graphed.blocks_all_back()


def test_padding_rows_write_no_kv(tiny_model_dir):
    engine = make_engine(tiny_model_dir, attention="triton")
    graphs = DecodeGraphs(engine.runner, (4,), 1024, factory=EagerGraph)
    graphs.capture()
    before = [t.clone() for t in engine.runner.kv.keys]
    graphs.graphs[4].replay()  # all four rows are padding
    assert all(torch.equal(a, b) for a, b in zip(before, engine.runner.kv.keys, strict=True))


class HostSyncRecorder(TorchDispatchMode):
    """Records aten ops that read device values on the host or make data-dependent shapes:
    each would fail CUDA-graph capture (or bake one step's values into the graph)."""

    SYNCING = {
        "aten._local_scalar_dense",
        "aten.item",  # what .item() and int() show under inference_mode
        "aten.is_nonzero",
        "aten.equal",
        "aten.nonzero",
        "aten.masked_select",
        "aten.lift_fresh",  # torch.tensor(python data): a host-to-device copy
    }

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNCING:
            self.found.append(name)
        if name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.found.append("aten.index with a boolean mask")
        return func(*args, **(kwargs or {}))


def test_recorder_sees_host_syncs():
    with HostSyncRecorder() as recorder:
        a = torch.tensor([1, 2, 3])
        a.sum().item()
        a[a > 1]
        with torch.inference_mode():
            int(a.max())
            bool(a[0])
    assert recorder.found == [
        "aten.lift_fresh",
        "aten._local_scalar_dense",
        "aten.index with a boolean mask",
        "aten.item",
        "aten.is_nonzero",
    ]


def test_graphed_decode_forward_never_syncs_with_the_host(tiny_model_dir):
    """Every op of the captured forward (embedding, RoPE lookup, Triton K/V write and
    split-context decode, linears, norms) runs on device values alone."""
    engine = make_engine(tiny_model_dir, attention="triton")
    graphs = DecodeGraphs(engine.runner, (1, 4), 1024, factory=EagerGraph)
    graphs.capture()
    for size in (1, 4):
        with HostSyncRecorder() as recorder:
            graphs.graphs[size].replay()
        assert recorder.found == [], f"batch {size}: {recorder.found}"
