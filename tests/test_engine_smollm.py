"""SmolLM2-135M in float32: greedy tokens equal transformers' generate on the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import Collector, drive, make_engine, spec

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "List three primary colors.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Give me a name for a pet turtle.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(smollm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def reference(smollm_dir, prompts):
    """transformers' greedy tokens and their log-probabilities, per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    out = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=2,
        )
        tokens = gen.sequences[0, ids.shape[1] :].tolist()
        logprobs = [
            torch.log_softmax(s[0].float(), -1)[t].item()
            for s, t in zip(gen.scores, tokens, strict=True)
        ]
        out.append((tokens, logprobs))
    return out


@pytest.fixture(scope="module")
def engine(smollm_dir):
    return make_engine(smollm_dir, kv_bytes=256 << 20)


def _check(collector: Collector, reference, ids):
    for i in ids:
        expected_tokens, expected_logprobs = reference[i]
        assert collector.tokens[i] == expected_tokens, QUESTIONS[i]
        diffs = [abs(a - b) for a, b in zip(collector.logprobs[i], expected_logprobs, strict=True)]
        assert max(diffs) < 1e-3


def test_each_prompt_alone(engine, prompts, reference):
    for i, text in enumerate(prompts):
        c = Collector()
        result = engine.prefill(100 + i, [spec(i, text, NEW_TOKENS)], None)
        c.add(result)
        drive(engine, c, result.batch)
        _check(c, reference, [i])


def test_all_in_one_batch(engine, prompts, reference):
    c = Collector()
    result = engine.prefill(1, [spec(i, t, NEW_TOKENS) for i, t in enumerate(prompts)], None)
    c.add(result)
    drive(engine, c, result.batch)
    _check(c, reference, range(len(prompts)))
    assert engine.blocks_all_back()


def test_requests_join_mid_flight_and_leave(engine, prompts, reference):
    c = Collector()
    first = engine.prefill(1, [spec(i, prompts[i], NEW_TOKENS) for i in range(4)], None)
    c.add(first)
    batch = first.batch
    for _ in range(5):
        result = engine.decode([batch.id])
        c.add(result)
        batch = result.batch
    joined = engine.prefill(2, [spec(i, prompts[i], NEW_TOKENS) for i in range(4, 8)], None)
    c.add(joined)
    merged = engine.decode([batch.id, joined.batch.id])
    c.add(merged)
    drive(engine, c, merged.batch)
    _check(c, reference, range(len(prompts)))
    assert not engine.batches
