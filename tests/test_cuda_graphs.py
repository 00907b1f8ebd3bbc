"""CUDA-graph decode: batch-size parsing and selection, padding of the static inputs, and
the whole replay path on CPU (EagerGraph stands in for torch.cuda.CUDAGraph)."""

from __future__ import annotations

import pytest
import torch

from shard.cuda_graphs import DecodeGraphs, EagerGraph, graph_batch_size, parse_batch_sizes
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
    graphed.graphs = DecodeGraphs(graphed, (1, 2, 4), factory=CountingGraph)
    graphed.graphs.capture()
    CountingGraph.replays.clear()
    for count in (1, 3, 5):  # one graph exactly, a padded graph, too many for any graph
        specs = [spec(i, p, 5 + i, ignore_eos=True) for i, p in enumerate(PROMPTS[:count])]
        expected = run_to_end(eager, 1, specs).tokens
        specs = [spec(i, p, 5 + i, ignore_eos=True) for i, p in enumerate(PROMPTS[:count])]
        assert run_to_end(graphed, 1, specs).tokens == expected
    # replays ran at padded sizes: 3 rows in the size-4 graph, never the 5-row batches
    assert CountingGraph.replays and set(CountingGraph.replays) <= {1, 2, 4}
    assert 4 in CountingGraph.replays
    graphs = graphed.graphs
    assert graphs.slots[3:].tolist() == [-1] and graphs.context[3:].tolist() == [1]
    assert not graphed.batches and len(graphed.free_blocks) == graphed.kv.num_blocks - 1


def test_padding_rows_write_no_kv(tiny_model_dir):
    engine = make_engine(tiny_model_dir, attention="triton")
    graphs = DecodeGraphs(engine, (4,), factory=EagerGraph)
    graphs.capture()
    before = [t.clone() for t in engine.kv.keys]
    graphs.graphs[4].replay()  # all four rows are padding
    assert all(torch.equal(a, b) for a, b in zip(before, engine.kv.keys, strict=True))
