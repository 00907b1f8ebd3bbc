"""Weights and KV pools in 2 MiB pages (shard/hugepages.py)."""

from __future__ import annotations

import re

import pytest
import torch

from shard import hugepages
from shard.kv_cache import KVCache
from tests.conftest import build_tiny_model
from tests.helpers import make_engine, run_to_end, spec


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        bounds = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if bounds:
            inside = int(bounds[1], 16) <= address < int(bounds[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_an_arena_starts_on_a_huge_page_and_is_mapped_in_them():
    buffer = hugepages.arena(8 << 20)
    assert buffer.numel() == 8 << 20 and buffer.dtype == torch.uint8
    assert buffer.data_ptr() % hugepages.HUGE_PAGE == 0
    if not hugepages.available():
        pytest.skip("this kernel offers no transparent huge pages (enabled: never)")
    buffer.fill_(1)  # the first writes map the pages
    assert anon_huge_kb(buffer.data_ptr()) >= 8 << 10  # all four 2 MiB pages


def test_carved_tensors_lie_apart_on_cache_lines():
    shapes = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((2, 2), torch.int64)]
    tensors = hugepages.carved(shapes)
    assert [(tuple(t.shape), t.dtype) for t in tensors] == shapes
    starts = [t.data_ptr() for t in tensors]
    assert all(s % 64 == 0 for s in starts)
    for t, following in zip(tensors, starts[1:], strict=False):
        assert t.data_ptr() + t.numel() * t.element_size() <= following
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    assert [t.flatten()[0].item() for t in tensors] == [1, 2, 3]  # no write reached another


def model_tensors(model) -> list[torch.Tensor]:
    walk = hugepages._Walk()
    walk.visit(model)
    return list(walk.tensors.values())


@pytest.mark.parametrize(
    "options",
    [
        dict(dtype="float32"),
        dict(dtype="bfloat16"),
        dict(dtype="float32", quantize="int4", quantize_group_size=32),
    ],
    ids=["float32", "bfloat16", "int4"],
)
def test_the_weights_move_into_one_arena_and_serve_the_same_tokens(tmp_path, smollm_dir, options):
    model_dir = build_tiny_model(tmp_path, smollm_dir, tie_word_embeddings=True)
    plain, huge = (make_engine(model_dir, huge_pages=h, **options) for h in (False, True))
    before, after = (model_tensors(e.runner.model) for e in (plain, huge))
    assert len(after) == len(before) > 0
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)
    storages = {t.untyped_storage().data_ptr() for t in after}
    assert len(storages) == 1  # one arena, nothing left on the checkpoint's file
    assert all(
        t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
        for t, s in zip(before, after, strict=True)
    )
    model = huge.runner.model
    head = model.lm_head.linear
    if "quantize" in options:  # int4 layers' scales and mins (a tuple) moved too
        assert all(q.untyped_storage().data_ptr() in storages for q in model.layers[0].qkv.qparams)
    elif head.plain is not None:  # tied: the head's single rows read the embedding's tensor
        assert head.plain is model.embed.weight
    prompts = [spec(i, text, 12) for i, text in enumerate(["Hello there", "1 2 3 4"])]
    tokens = [run_to_end(e, 1, prompts).tokens for e in (plain, huge)]
    assert tokens[0] == tokens[1]


def test_the_kv_pools_share_one_zeroed_arena():
    kv = KVCache(3, 5, 4, 2, 8, torch.bfloat16, huge_pages=True)
    pools = kv.keys + kv.values
    assert len(pools) == 6 and all(p.shape == (5, 4, 2, 8) for p in pools)
    assert len({p.untyped_storage().data_ptr() for p in pools}) == 1
    assert all(not p.any() for p in pools)
    for i, p in enumerate(pools):
        p.fill_(i + 1)
    assert [int(p.float().mean()) for p in pools] == [1, 2, 3, 4, 5, 6]  # no overlap
    assert kv.nbytes == 6 * 5 * 4 * 2 * 8 * 2
