"""Tool calling's pieces without a model: the plan (tools and tool_choice checked, the
grammar that forces a call), the grammar's masks on SmolLM2's vocabulary, the parse of a
generated call, and the streaming of a call as OpenAI's deltas."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from common.grammar import JSON, LARK, GrammarCache
from router.tools import CallStreamer, parse_call, plan_tools
from router.validation import ValidationError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def grammars(smollm_dir):
    tokenizer = Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))
    return tokenizer, GrammarCache(tokenizer, None, [2])


def _allowed(matcher, tokenizer, text: str) -> bool:
    """Whether the matcher accepts `text` next (token by token, as encoded)."""
    for token in tokenizer.encode(text, add_special_tokens=False).ids:
        mask = matcher.compute_bitmask()
        if not mask[token // 8] >> (token % 8) & 1:
            return False
        matcher.consume_token(token)
    return True


@pytest.mark.parametrize(
    "tools, choice, message",
    [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope'"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([{"type": "retrieval"}], "auto", "type"),
        ([{"type": "function", "function": {}}], "auto", "name"),
        ([{"type": "function", "function": {"name": "f", "parameters": 3}}], None, "schema"),
        (None, "required", "needs `tools`"),
    ],
)
def test_bad_tools_or_tool_choice_are_a_clear_422(tools, choice, message):
    with pytest.raises(ValidationError, match=message):
        plan_tools(tools, choice)


def test_the_plan_follows_tool_choice():
    assert plan_tools(None, None) is None and plan_tools([WEATHER], "none") is None
    auto = plan_tools([WEATHER, TIME], None)
    assert auto.text_allowed and auto.grammar.kind == LARK
    required = plan_tools([WEATHER, TIME], "required")
    assert not required.text_allowed and required.grammar.kind == JSON
    assert len(json.loads(required.grammar.text)["anyOf"]) == 2
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert json.loads(named.grammar.text)["properties"]["name"] == {"const": "get_time"}


def test_required_forces_a_call_of_a_listed_tool(grammars):
    tokenizer, cache = grammars
    spec = plan_tools([WEATHER, TIME], "required").grammar
    assert not _allowed(cache.matcher(spec), tokenizer, "Hello")
    assert _allowed(
        cache.matcher(spec), tokenizer, '{"name":"get_weather","arguments":{"city":"Paris"}}'
    )
    assert not _allowed(cache.matcher(spec), tokenizer, '{"name":"get_stock"')
    assert not _allowed(
        cache.matcher(spec), tokenizer, '{"name":"get_weather","arguments":{"unit":"k"'
    )


def test_auto_leaves_text_open_and_holds_a_started_call_to_the_schemas(grammars):
    tokenizer, cache = grammars
    spec = plan_tools([WEATHER], "auto").grammar
    assert _allowed(cache.matcher(spec), tokenizer, "It is sunny in Paris.")
    assert _allowed(
        cache.matcher(spec), tokenizer, '{"name":"get_weather","arguments":{"city":"Rome"}}'
    )
    assert not _allowed(cache.matcher(spec), tokenizer, '{"hello": 1}')


def test_a_generated_call_parses_as_openai_shapes_it():
    call = parse_call('{"name":"get_weather","arguments":{"city":"Paris"}}')
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse_call("It is sunny.") is None
    assert parse_call('{"name":"get_weather","argu') is None  # cut short by max_tokens


@pytest.mark.parametrize("piece_size", [1, 3, 7, 100])
def test_a_streamed_call_gives_its_name_then_its_arguments_in_pieces(piece_size):
    text = '{"name":"get_weather","arguments":{"city":"Par\\"is","unit":"c"}}'
    streamer = CallStreamer()
    deltas = []
    pieces = [text[i : i + piece_size] for i in range(0, len(text), piece_size)]
    for i, piece in enumerate(pieces):
        deltas += streamer.push(piece, i == len(pieces) - 1)
    first = deltas[0]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""} and first["id"]
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert json.loads(arguments) == {"city": 'Par"is', "unit": "c"}
    assert streamer.is_call and all("content" not in d for d in deltas)


def test_streamed_text_under_auto_is_plain_content():
    streamer = CallStreamer()
    deltas = (
        streamer.push("  ", False) + streamer.push("It is", False) + streamer.push(" sunny", True)
    )
    assert "".join(d["content"] for d in deltas) == "  It is sunny"
    assert not streamer.is_call


def test_chat_templates_get_the_environment_transformers_gives_them(tmp_path, smollm_dir):
    import shutil

    from router.chat import ChatTemplate
    from router.startup import StartupError, load_tokenizer

    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m|tojson(indent=1, sort_keys=true) }}{% endfor %}"
        "{% if tools %}{{ tools|tojson }}{% endif %}"
    )
    template = ChatTemplate(source, {})
    messages = [{"role": "user", "content": "é"}, {"role": "b", "content": "2"}, {"role": "c"}]
    text = template.render(messages, tools=[{"name": "f"}])
    assert '"content": "é"' in text and '"role": "c"' not in text and '[{"name": "f"}]' in text
    assert template.takes_tools
    shutil.copy(smollm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m }")
    with pytest.raises(StartupError, match="chat template .* does not compile"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize(
    "pattern, reason",
    [(r"[^\s\S]", "no text matches it"), ("(a|b", "unclosed group"), ("a{0}", "no output")],
)
def test_a_grammar_without_output_is_refused_with_its_reason(grammars, pattern, reason):
    from common.grammar import REGEX, GrammarSpec

    tokenizer, _ = grammars
    with pytest.raises(ValueError, match=reason):
        GrammarCache(tokenizer, None, []).matcher(GrammarSpec(REGEX, pattern))
