"""Constrained generation in the shard, on a tiny random-weight model (the hardest case: its
unconstrained output is noise, so only the mask makes it valid).

Every output parses and validates against its schema (or matches its regex), greedy and
sampled, alone and in batches mixed with free rows, with chunked prefill; free rows are
untouched by their neighbours' masks; a grammar that allows everything changes nothing; a
grammar that cannot be used is refused alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from common.grammar import JSON, REGEX, GrammarSpec, json_schema_spec
from shard.sampling import SamplingParams
from shard.stopping import FinishReason
from tests.helpers import Collector, run_to_end, spec

SCHEMAS = [
    {  # nested object, enum, bounded integer, required and optional fields
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "color": {"enum": ["red", "green", "blue"]},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"],
                "additionalProperties": False,
            },
            "nickname": {"type": "string", "maxLength": 4},
        },
        "required": ["name", "age", "color", "address"],
        "additionalProperties": False,  # else a random model may invent keys for ever
    },
    {  # an array of bounded items, a boolean
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["ok", "scores"],
        "additionalProperties": False,
    },
    {  # a string pattern and a bounded number
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["code"],
        "additionalProperties": False,
    },
]
REGEXES = [r"[0-9]{3}-[a-z]{2}", r"(yes|no)", r"[A-Z][a-z]{1,5} [0-9]{1,2}"]
PROMPTS = ["The quick brown fox", "Hello", "In a hole in the ground there lived a hobbit."]
SAMPLED = SamplingParams(do_sample=True, temperature=1.5, seed=7)
NEW_TOKENS = 200  # enough for every schema above to close


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from tests.helpers import make_engine

    return make_engine(tiny_model_dir)


def _text(engine, tokens: list[int]) -> str:
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def _json_spec(schema: dict) -> GrammarSpec:
    return json_schema_spec(schema)


def _check_json(engine, collector: Collector, request_id: int, schema: dict) -> None:
    text = _text(engine, collector.tokens[request_id])
    jsonschema.validate(json.loads(text), schema)
    assert collector.finished[request_id].finish_reason == FinishReason.EOS_TOKEN


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_every_json_output_validates_alone_and_batched(engine, sampling):
    specs = [
        spec(i, PROMPTS[i % len(PROMPTS)], NEW_TOKENS, sampling=sampling,
             grammar=_json_spec(schema))
        for i, schema in enumerate(SCHEMAS)
    ]  # fmt: skip
    together = run_to_end(engine, 1, specs)
    for i, schema in enumerate(SCHEMAS):
        _check_json(engine, together, i, schema)
        alone = run_to_end(engine, 2, [specs[i]])
        assert alone.tokens[i] == together.tokens[i]  # a row's mask is its own
    assert engine.blocks_all_back()


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_every_regex_output_matches(engine, sampling):
    specs = [
        spec(i, PROMPTS[i], 40, sampling=sampling, grammar=GrammarSpec(REGEX, pattern))
        for i, pattern in enumerate(REGEXES)
    ]
    result = run_to_end(engine, 1, specs)
    for i, pattern in enumerate(REGEXES):
        assert re.fullmatch(pattern, _text(engine, result.tokens[i])), result.tokens[i]


def test_free_rows_beside_constrained_ones_are_untouched(engine):
    free = [spec(10 + i, p, 12, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    alone = {s.id: run_to_end(engine, 3, [s]).tokens[s.id] for s in free}
    constrained = [
        spec(i, PROMPTS[i], NEW_TOKENS, grammar=_json_spec(s)) for i, s in enumerate(SCHEMAS)
    ]
    mixed = run_to_end(engine, 4, free + constrained)
    assert {s.id: mixed.tokens[s.id] for s in free} == alone
    for i, schema in enumerate(SCHEMAS):
        _check_json(engine, mixed, i, schema)


def test_a_grammar_that_allows_everything_changes_nothing(smollm_dir):
    """On SmolLM2 (a random model's output is not always valid UTF-8, which every grammar
    requires): any text allowed, the tokens are the free ones, EOS included."""
    from tests.helpers import make_engine

    engine = make_engine(smollm_dir)
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    for i, question in enumerate(["What is 2 + 2?", "Name a color.", "Say hi in French."]):
        prompt = template.format(question)
        free = run_to_end(engine, 5, [spec(i, prompt, 24)])
        anything = run_to_end(
            engine, 6, [spec(i, prompt, 24, grammar=GrammarSpec(REGEX, r"(?s:.*)"))]
        )
        assert anything.tokens[i] == free.tokens[i]
        assert anything.finished[i].finish_reason == free.finished[i].finish_reason


def test_chunked_prefill_leaves_the_constrained_output_unchanged(engine):
    long_prompt = " ".join(PROMPTS * 4)
    grammar = _json_spec(SCHEMAS[0])
    whole = run_to_end(engine, 7, [spec(1, long_prompt, NEW_TOKENS, grammar=grammar)])
    chunked = run_to_end(
        engine, 8, [spec(1, long_prompt, NEW_TOKENS, grammar=grammar, chunk_len=8)]
    )
    assert chunked.tokens[1] == whole.tokens[1]
    _check_json(engine, chunked, 1, SCHEMAS[0])


@pytest.mark.parametrize(
    "grammar, reason",
    [
        (GrammarSpec(REGEX, "(a|b"), "unclosed group"),
        (GrammarSpec(JSON, '{"type": "object", "properties": {"a": {"type": "nope"}}}'), "nope"),
        (GrammarSpec(JSON, "not json"), "not valid JSON"),
        (GrammarSpec("yaml", "a: b"), "unknown grammar type"),
    ],
)
def test_a_grammar_that_cannot_be_used_is_refused_alone(engine, grammar, reason):
    good = spec(1, PROMPTS[0], 6, ignore_eos=True)
    result = engine.prefill(9, [spec(2, "x", 6, grammar=grammar), good], None)
    assert [r.request_id for r in result.refused] == [2] and reason in result.refused[0].message
    assert [g.request_id for g in result.generations] == [1]
    engine.clear(None)
    assert engine.blocks_all_back()


def test_compiled_grammars_are_cached_and_each_request_has_its_own_state(engine):
    compiler = engine.admission.grammars
    first = compiler.compile(_json_spec(SCHEMAS[1]))
    second = compiler.compile(_json_spec(SCHEMAS[1]))
    assert first is not second and first._matcher is not second._matcher
    assert len(compiler._cache._cache) >= 1
    start = first.allowed()
    first.advance(int(start.nonzero()[0]))  # an allowed first token
    assert not torch.equal(first.allowed(), start)  # moved on
    assert torch.equal(second.allowed(), start)  # still at its start
