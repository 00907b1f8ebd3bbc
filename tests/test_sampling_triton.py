"""The greedy choice's Triton kernels (shard/sampling_triton.py), run on CPU under
TRITON_INTERPRET=1: torch's argmax (the first of equal maxima) and max - logsumexp."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from shard.sampling_triton import CHUNK, greedy_choice  # noqa: E402


@pytest.mark.parametrize("vocab", [100, CHUNK, 3 * CHUNK + 17])  # one piece, exact, a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_choice_is_torchs(vocab, dtype):
    logits = (torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab)) * 4).to(dtype)
    ids, logprobs = greedy_choice(logits)
    wide = logits.float()
    assert torch.equal(ids, wide.argmax(-1))
    expected = wide.max(-1).values - torch.logsumexp(wide, -1)
    assert torch.allclose(logprobs, expected, atol=1e-5, rtol=0)


# pieces of -inf logits subtract -inf from -inf before the mask drops them (numpy warns)
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_ties_and_masked_logits():
    """Equal maxima in two pieces: the first index; -inf logits (a grammar's mask) count
    nothing; a strided view and an empty batch."""
    logits = torch.full((2, 2 * CHUNK + 5), float("-inf"))
    logits[0, [7, CHUNK + 3]] = 2.0
    logits[1, [CHUNK + 9, 2 * CHUNK + 1]] = torch.tensor([1.0, 1.0])
    logits[1, 2 * CHUNK + 4] = -3.0
    ids, logprobs = greedy_choice(logits)
    assert ids.tolist() == [7, CHUNK + 9]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).max(-1).values)
    wide = torch.randn(4, 2 * 300)
    ids, _ = greedy_choice(wide[:, ::2])
    assert torch.equal(ids, wide[:, ::2].argmax(-1))
    ids, logprobs = greedy_choice(torch.empty(0, 50))
    assert ids.shape == (0,) and logprobs.shape == (0,)
