"""Token choice, stopping and incremental detokenization, in milliseconds."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer

from shard.detokenize import IncrementalDetokenizer
from shard.errors import InvalidRequest
from shard.sampling import SamplingParams, TokenChooser, choose_tokens
from shard.stopping import FinishReason, StoppingCriteria


def _choose(logits, params, history=(), top_n=0):
    chooser = TokenChooser(params)
    return choose_tokens(logits.unsqueeze(0), [chooser], [list(history)], [top_n])[0]


def test_greedy_picks_argmax_with_its_logprob():
    logits = torch.tensor([1.0, 3.0, 2.0])
    choice = _choose(logits, SamplingParams(), top_n=2)
    assert choice.token_id == 1
    assert choice.logprob == pytest.approx(torch.log_softmax(logits, -1)[1].item())
    assert choice.top_ids == [1, 2]


def test_repetition_penalty_follows_hf_rule():
    chooser = TokenChooser(SamplingParams(repetition_penalty=2.0))
    out = chooser.apply_penalties(torch.tensor([4.0, -4.0, 1.0]), [0, 1])
    assert out.tolist() == [2.0, -8.0, 1.0]


def test_frequency_penalty_counts_generated_tokens():
    chooser = TokenChooser(SamplingParams(frequency_penalty=0.5))
    for token in (2, 2, 0):
        chooser.record(token)
    out = chooser.apply_penalties(torch.zeros(3), [])
    assert out.tolist() == [-0.5, 0.0, -1.0]


def test_presence_penalty_counts_each_generated_token_once_and_logit_bias_comes_first():
    chooser = TokenChooser(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    for token in (2, 2, 0):
        chooser.record(token)
    out = chooser.apply_penalties(torch.zeros(3), [])
    assert out.tolist() == [-0.75, 0.0, -1.0]
    biased = SamplingParams(logit_bias=((0, -100.0), (2, 5.0)))
    assert _choose(torch.tensor([3.0, 1.0, 0.0]), biased).token_id == 2
    assert TokenChooser(biased).apply_penalties(torch.zeros(3), []).tolist() == [-100.0, 0.0, 5.0]
    with pytest.raises(InvalidRequest, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),)).validate()
    with pytest.raises(InvalidRequest, match="presence_penalty"):
        SamplingParams(presence_penalty=math.inf).validate()


def test_top_k_top_p_typical_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(TokenChooser(SamplingParams(do_sample=True, top_k=2)).warp(logits)[2:]).all()
    kept = ~torch.isinf(TokenChooser(SamplingParams(do_sample=True, top_p=0.7)).warp(logits))
    assert kept.tolist() == [True, True, False, False]
    kept = ~torch.isinf(TokenChooser(SamplingParams(do_sample=True, typical_p=0.5)).warp(logits))
    assert kept.sum() >= 1


def test_seeded_sampling_is_reproducible_and_warpers_imply_sampling():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(do_sample=True, seed=7)
    a = [_choose(logits, params).token_id for _ in range(3)]
    b = [_choose(logits, params).token_id for _ in range(3)]
    assert a == b
    assert SamplingParams(temperature=0.5).is_sampling and not SamplingParams().is_sampling
    assert not SamplingParams(temperature=0.0).is_sampling


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(do_sample=True, temperature=0.0), "temperature"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(typical_p=2.0), "typical_p"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(temperature=math.nan), "finite"),
    ],
)
def test_invalid_sampling_params(params, message):
    with pytest.raises(InvalidRequest, match=message):
        params.validate()


def test_stopping_reasons():
    eos = StoppingCriteria(5, [], frozenset({2}))
    assert eos.step(2, "") == FinishReason.EOS_TOKEN
    ignored = StoppingCriteria(2, [], frozenset({2}), ignore_eos=True)
    assert ignored.step(2, "") is None and ignored.step(2, "") == FinishReason.LENGTH
    across = StoppingCriteria(10, ["END"], frozenset())
    assert across.step(5, "the E") is None
    assert across.step(6, "N") is None
    assert across.step(7, "D!") == FinishReason.STOP_SEQUENCE


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))


@pytest.mark.parametrize(
    "text", ["Hello 😀 world", "你好，世界", "naïve café 🎉🎉", "plain ascii text"]
)
def test_incremental_detokenization_never_breaks_characters(tokenizer, text):
    prompt = tokenizer.encode("Say:", add_special_tokens=False).ids
    output = tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(len(prompt))
    ids = list(prompt)
    pieces = []
    for token in output:
        ids.append(token)
        pieces.append(detok.step(tokenizer, ids))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(output)
    if any(ord(ch) > 0xFFFF or "\u4e00" <= ch <= "\u9fff" for ch in text):
        assert "" in pieces  # some token held back a partial character
