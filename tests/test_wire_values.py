"""Values at the edges of the types they travel in: rejected at the router's edge with 422,
and, if they reach a shard anyway, never able to fail anyone else's request."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from router.schemas import GenerateParameters
from router.startup import load_tokenizer
from router.stops import StopMatcher, trim_at_stop
from router.validation import Limits, ValidationError, Validator, as_float32
from shard.sampling import SamplingParams, TokenChooser, choose_tokens

# (parameters, words the 422 message must hold): each once broke a whole running batch
HOSTILE = [
    ({"top_k": 2**32}, "top_k"),
    ({"top_k": 2**64}, "top_k"),
    ({"top_p": 1e-50}, "top_p"),
    ({"typical_p": 1e-50}, "typical_p"),
    ({"temperature": 1e39}, "temperature"),
    ({"temperature": 1e-50}, "temperature"),
    ({"temperature": 1e-38, "do_sample": True}, "temperature"),
    ({"repetition_penalty": 1e39}, "repetition_penalty"),
    ({"repetition_penalty": 1e-50}, "repetition_penalty"),
    ({"frequency_penalty": -1e39}, "frequency_penalty"),
    ({"max_new_tokens": 2**32}, "max_new_tokens"),
    ({"top_n_tokens": 2**32}, "top_n_tokens"),
    ({"truncate": 2**32}, "truncate"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ["\ud800"]}, "stop"),
    ({"stop": ["ok", "x\udfffy"]}, "stop"),
    ({"stop": ["s" * 1025]}, "1024 characters"),
    ({"stop": ["s" * 500_000] * 4}, "1024 characters"),
]


@pytest.fixture(scope="module")
def validator(smollm_dir):
    tokenizer, _ = load_tokenizer(str(smollm_dir))
    return Validator(tokenizer, Limits(max_input_tokens=1000, max_total_tokens=2000))


def _validate(validator, inputs: str, **parameters):
    return asyncio.run(validator.validate(inputs, GenerateParameters(**parameters)))


@pytest.mark.parametrize("parameters, words", HOSTILE)
def test_hostile_values_are_rejected_in_their_wire_type(validator, parameters, words):
    with pytest.raises(ValidationError, match=words):
        _validate(validator, "hello", **parameters)


def test_a_lone_surrogate_in_the_prompt_is_rejected(validator):
    with pytest.raises(ValidationError, match="lone surrogate"):
        _validate(validator, "hi \ud800 there")


def test_accepted_values_travel_as_their_float32(validator):
    valid = _validate(validator, "hello", top_p=0.9, temperature=0.7, top_k=2**32 - 1)
    assert valid.params.top_p == as_float32("top_p", 0.9) != 0.9
    assert valid.params.temperature == as_float32("t", 0.7)
    assert valid.params.top_k == 2**32 - 1
    edge = _validate(validator, "hello", stop=["s" * 1024], temperature=1.2e-38, do_sample=True)
    assert edge.params.stop == ("s" * 1024,)
    # 1 - 1e-9 is below 1 as a double but rounds to 1.0 in float32: top_p must be < 1 there
    with pytest.raises(ValidationError, match="top_p"):
        _validate(validator, "hello", top_p=1 - 1e-9)


# ---- the shard side: extreme but legal values never raise mid-batch ----
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=1e-38),
        SamplingParams(do_sample=True, temperature=1e-30, top_p=1e-40),
        SamplingParams(do_sample=True, repetition_penalty=1e-38),
        SamplingParams(do_sample=True, typical_p=1e-40),
        SamplingParams(do_sample=True, top_k=2**32 - 1),
    ],
)
def test_extreme_sampling_values_choose_a_token_without_raising(params):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=gen) * 20
    greedy = SamplingParams()
    choosers = [TokenChooser(greedy), TokenChooser(params), TokenChooser(greedy)]
    histories = [[1, 2], [3, 4, int(logits[1].argmax())], [5]]
    choices = choose_tokens(logits, choosers, histories, [0, 2, 0])
    assert [c.token_id for c in (choices[0], choices[2])] == logits[[0, 2]].argmax(-1).tolist()
    assert 0 <= choices[1].token_id < 500


def test_a_tiny_temperature_samples_the_greedy_token():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3)) * 10
    chooser = TokenChooser(SamplingParams(do_sample=True, temperature=1e-38, seed=7))
    [choice] = choose_tokens(logits, [chooser], [[]], [0])
    assert choice.token_id == int(logits[0].argmax()) and choice.logprob == 0.0


def test_a_row_of_nan_logits_falls_back_instead_of_raising():
    logits = torch.randn(2, 100)
    logits[1] = float("nan")
    sampled = [TokenChooser(SamplingParams(do_sample=True, seed=s)) for s in (1, 2)]
    choices = choose_tokens(logits, sampled, [[], []], [0, 0])
    assert len(choices) == 2


# ---- stop sequences in streams: linear, exact ----
def test_stop_matcher_equals_cutting_the_whole_text():
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(3)]
        pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 4))) for _ in range(6)]
        matcher = StopMatcher(stops)
        sent = "".join(m for i, p in enumerate(pieces) if (m := matcher.push(p, i == 5)))
        full = "".join(pieces)
        assert not any(s in sent for s in stops)  # no stop sequence ever reaches the client
        if matcher.is_stopped:  # cut right before the stop sequence that completed first
            assert any(full.startswith(sent + s) for s in stops)
            assert len(sent) <= len(trim_at_stop(full, stops)) + 4
        else:
            assert sent == full


def test_stop_matcher_holds_back_only_a_possible_start():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("hello ST") == "hello "
    assert matcher.push("OR") == "STOR"  # "STOR" cannot start "STOP"
    assert matcher.push("e S") == "e "
    assert matcher.push("TOP and more") == "" and matcher.is_stopped
    assert matcher.push("later") == ""


def test_stop_matcher_work_is_linear_in_the_text():
    """Four 1024-character stops over 2,000 tokens: far under a second (the old hold-back
    compared every prefix of every stop at every token, quadratic in their length)."""
    import time

    stops = ["ab" * 511 + "c", "ba" * 511 + "c", "a" * 1023 + "b", "x" * 1024]
    matcher = StopMatcher(stops)
    started = time.perf_counter()
    sent = sum(len(matcher.push("ab")) for _ in range(2000))
    assert time.perf_counter() - started < 1.0
    assert not matcher.is_stopped and sent == 4000 - 1022  # the rest may still start "ab..c"
