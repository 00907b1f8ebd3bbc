"""The HTTP layer in-process over a fake shard: auth, overload, draining, health."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from common.allocator import BlockAllocator
from router.app import create_app
from router.core import RouterState, ServerSettings
from router.metrics import Metrics
from router.scheduler import BatchingConfig, Scheduler
from router.startup import load_tokenizer
from router.types import ShardInfo, WarmupOut
from router.validation import Limits, Validator
from tests.fake_shard import FakeShard


class HealthyFake(FakeShard):
    healthy: bool = True

    async def health(self) -> None:
        if not self.healthy:
            raise RuntimeError("shard 0 is gone")


def make_state(tokenizer_dir, grammar_support: bool = True, **settings) -> RouterState:
    tokenizer, template = load_tokenizer(str(tokenizer_dir))
    metrics = Metrics()
    scheduler = Scheduler(
        HealthyFake(), BlockAllocator(500, 16), BatchingConfig(256, 8000), metrics
    )
    return RouterState(
        settings=ServerSettings(model_id="fake", **settings),
        validator=Validator(
            tokenizer,
            Limits(max_input_tokens=1000, max_total_tokens=2000, grammar_support=grammar_support),
        ),
        scheduler=scheduler,
        metrics=metrics,
        shard_info=ShardInfo("float32", "cpu", 16, True, True, "reference"),
        warmup=WarmupOut(8000, 1000, 2000),
        chat_template=template,
    )


@pytest.fixture
async def client_for(smollm_dir):
    tasks = []

    async def make(**settings):
        state = make_state(smollm_dir, **settings)
        tasks.append(asyncio.ensure_future(state.scheduler.run()))
        transport = httpx.ASGITransport(app=create_app(state))
        return state, httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)

    yield make
    for task in tasks:
        task.cancel()


async def test_api_key_guards_generation_routes_not_health(client_for):
    state, client = await client_for(api_key="s3cret")
    body = {"inputs": "a b c", "parameters": {"max_new_tokens": 2}}
    for path in (
        "/generate",
        "/generate_stream",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
    ):
        reply = await client.post(path, json=body)
        assert reply.status_code == 401 and reply.json()["error_type"] == "authentication"
    wrong = await client.post("/generate", json=body, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = await client.post("/generate", json=body, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["generated_text"] == " t1 t2"
    assert (await client.get("/health")).status_code == 200


async def test_past_max_concurrent_requests_is_429_at_once(client_for):
    state, client = await client_for(max_concurrent_requests=2)
    slow = {"inputs": "a", "parameters": {"max_new_tokens": 300}}
    running = [asyncio.ensure_future(client.post("/generate", json=slow)) for _ in range(2)]
    while state.in_flight < 2:
        await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    rejected = await client.post("/generate", json=slow)
    assert rejected.status_code == 429 and rejected.json()["error_type"] == "overloaded"
    assert asyncio.get_running_loop().time() - started < 1.0
    assert all(r.status_code == 200 for r in await asyncio.gather(*running))
    assert (
        await client.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 1}})
    ).status_code == 200


async def test_draining_refuses_new_requests_with_503(client_for):
    state, client = await client_for()
    state.is_draining = True
    reply = await client.post(
        "/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 1}}
    )
    assert reply.status_code == 503 and reply.json()["error_type"] == "unhealthy"


async def test_health_is_503_when_a_shard_fails(client_for, caplog):
    state, client = await client_for()
    state.scheduler.client.healthy = False
    reply = await client.get("/health")
    assert reply.status_code == 503 and reply.json()["error"] == "a shard is not healthy"
    assert "shard 0 is gone" in caplog.text  # the cause is logged, not returned


async def test_unknown_route_and_method_keep_the_error_shape(client_for):
    state, client = await client_for()
    missing = await client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    wrong = await client.get("/generate")
    assert wrong.status_code == 405 and wrong.json()["error_type"] == "method_not_allowed"


async def test_completions_usage_counts_every_prompt(client_for):
    state, client = await client_for()
    prompts = ["alpha beta", "gamma delta epsilon"]
    expected_prompt = sum(len(state.validator.tokenizer.encode(p).ids) for p in prompts)
    body = {"prompt": prompts, "max_tokens": 2, "temperature": 0}
    usage = (await client.post("/v1/completions", json=body)).json()["usage"]
    assert usage == {
        "prompt_tokens": expected_prompt,
        "completion_tokens": 4,
        "total_tokens": expected_prompt + 4,
    }
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    lines = (await client.post("/v1/completions", json=stream_body)).text.splitlines()
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    assert json.loads(events[-2])["usage"] == usage


async def test_bearer_scheme_is_case_insensitive(client_for):
    state, client = await client_for(api_key="s3cret")
    body = {"inputs": "a", "parameters": {"max_new_tokens": 1}}
    for header in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):
        reply = await client.post("/generate", json=body, headers={"authorization": header})
        assert reply.status_code == 200, header
    for header in ("Basic s3cret", "s3cret", "Bearer s3cret2", "Bearer"):
        reply = await client.post("/generate", json=body, headers={"authorization": header})
        assert reply.status_code == 401, header


async def test_json_routes_need_a_json_content_type(client_for):
    state, client = await client_for()
    body = json.dumps({"inputs": "a", "parameters": {"max_new_tokens": 1}}).encode()
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "multipart/form-data"}):
        reply = await client.post("/generate", content=body, headers=headers)
        assert reply.status_code == 415, headers
        assert reply.json()["error_type"] == "unsupported_media_type"
    ok = await client.post(
        "/generate", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200


async def test_a_loopback_server_without_a_key_answers_only_loopback_hosts(client_for):
    from router.startup import LOOPBACK_NAMES, allowed_hosts

    assert allowed_hosts("127.0.0.1", None) == LOOPBACK_NAMES
    assert allowed_hosts("127.0.0.1", "k") == () and allowed_hosts("0.0.0.0", None) == ()
    state, client = await client_for(allowed_hosts=LOOPBACK_NAMES)
    for host in ("localhost:3000", "127.0.0.1:3000", "[::1]:3000", "localhost"):
        assert (await client.get("/info", headers={"host": host})).status_code == 200, host
    for host in ("attacker.example:3000", "attacker.example", "127.0.0.1.evil.test", ""):
        reply = await client.get("/info", headers={"host": host})
        assert reply.status_code == 421, host
        assert reply.json()["error_type"] == "misdirected_request"


async def test_tokenize_takes_a_slot(client_for):
    state, client = await client_for(max_concurrent_requests=1)
    state.acquire()  # the only slot is busy
    try:
        reply = await client.post("/tokenize", json={"inputs": "hello world"})
        assert reply.status_code == 429
    finally:
        state.release()
    reply = await client.post("/tokenize", json={"inputs": "hello world"})
    assert reply.status_code == 200 and [t["text"] for t in reply.json()] == ["hello", " world"]
    assert state.in_flight == 0


async def test_a_body_slower_than_the_client_timeout_is_408(client_for):
    state, client = await client_for(client_timeout=0.3)

    async def trickle():
        yield b'{"inputs": "a",'
        await asyncio.sleep(1.0)
        yield b' "parameters": {}}'

    reply = await client.post(
        "/generate", content=trickle(), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 408 and reply.json()["error_type"] == "request_timeout"


def test_a_server_beyond_loopback_without_a_key_is_warned_of():
    from router.startup import exposure_warning

    assert exposure_warning("0.0.0.0", None) is not None
    assert "--api-key" in exposure_warning("10.1.2.3", None)
    assert exposure_warning("0.0.0.0", "k") is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None


async def test_info_reports_the_validation_workers(client_for):
    state, client = await client_for()
    state.validator = Validator(state.validator.tokenizer, state.validator.limits, workers=3)
    assert (await client.get("/info")).json()["validation_workers"] == 3
    assert state.validator._pool._max_workers == 3


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    "path, extra, expected",
    [
        ("/generate", {"parameters": {"grammar": {"type": "json", "value": SCHEMA}}}, SCHEMA),
        ("/generate", {"parameters": {"grammar": {"type": "json", "value": json.dumps(SCHEMA)}}},
         SCHEMA),
        ("/generate", {"parameters": {"grammar": {"type": "json_schema",
                                                   "value": {"name": "n", "schema": SCHEMA}}}},
         SCHEMA),
        ("/generate", {"parameters": {"grammar": {"type": "regex", "value": "[0-9]+"}}},
         "[0-9]+"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": SCHEMA, "strict": True}}}, SCHEMA),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}},
         {"type": "object"}),
        ("/v1/chat/completions", {"response_format": {"type": "json", "value": SCHEMA}}, SCHEMA),
        ("/v1/chat/completions", {"response_format": {"type": "regex", "value": "a+"}}, "a+"),
        ("/v1/chat/completions", {"response_format": {"type": "text"}}, None),
    ],
)  # fmt: skip
async def test_each_grammar_form_reaches_the_shards_as_its_schema_or_regex(
    client_for, path, extra, expected
):
    from common.grammar import JSON, REGEX

    state, client = await client_for()
    body = {"inputs": "a b"} if path == "/generate" else {"messages": [{"role": "user",
                                                                        "content": "hi"}]}  # fmt: skip
    body = {**body, **extra}
    body.setdefault("parameters", {})["max_new_tokens"] = 2
    if path != "/generate":
        body["max_tokens"] = 2
    reply = await client.post(path, json=body)
    assert reply.status_code == 200, reply.text
    grammar = state.scheduler.client.requests[-1].params.grammar
    if expected is None:
        assert grammar is None
    elif isinstance(expected, str):
        assert grammar.kind == REGEX and grammar.text == expected
    else:
        assert grammar.kind == JSON and json.loads(grammar.text) == expected


async def test_disable_grammar_support_refuses_grammars_and_response_formats(client_for):
    state, client = await client_for(grammar_support=False)
    grammar = {"type": "regex", "value": "a+"}
    reply = await client.post("/generate", json={"inputs": "x", "parameters": {"grammar": grammar}})
    assert reply.status_code == 422 and "--disable-grammar-support" in reply.json()["error"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "response_format": grammar}
    reply = await client.post("/v1/chat/completions", json=chat)
    assert reply.status_code == 422 and "--disable-grammar-support" in reply.json()["error"]
    plain = await client.post(
        "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}
    )
    assert plain.status_code == 200


async def test_presence_penalty_and_logit_bias_reach_the_shards(client_for):
    state, client = await client_for()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "presence_penalty": 0.5, "logit_bias": {"42": -100, "7": 2.5}}  # fmt: skip
    reply = await client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    params = state.scheduler.client.requests[-1].params
    assert params.presence_penalty == 0.5 and params.logit_bias == ((7, 2.5), (42, -100.0))
    completion = {"prompt": "hi", "max_tokens": 2, "logit_bias": {"3": 1}}
    assert (await client.post("/v1/completions", json=completion)).status_code == 200
    assert state.scheduler.client.requests[-1].params.logit_bias == ((3, 1.0),)


async def test_n_choices_for_chat_and_completions_streamed_or_not(client_for):
    state, client = await client_for()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 3,
            "temperature": 0.8, "seed": 5}  # fmt: skip
    reply = (await client.post("/v1/chat/completions", json=chat)).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["usage"]["completion_tokens"] == 9
    seeds = [r.params.seed for r in state.scheduler.client.requests[-3:]]
    assert seeds == [5, 6, 7]  # each choice its own seed
    lines = []
    async with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True,
                             "stream_options": {"include_usage": True}}) as stream:  # fmt: skip
        async for line in stream.aiter_lines():
            if line.startswith("data: {"):
                lines.append(json.loads(line[6:]))
    finishes = [c["index"] for x in lines for c in x["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2] and lines[-1]["usage"]["completion_tokens"] == 9
    completion = {"prompt": ["a b", "c d"], "max_tokens": 2, "n": 2}
    reply = (await client.post("/v1/completions", json=completion)).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert reply["usage"]["completion_tokens"] == 8 and reply["usage"]["prompt_tokens"] > 0
    chunks = []
    async with client.stream("POST", "/v1/completions", json={**completion, "stream": True}) as s:
        async for line in s.aiter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [
        0, 1, 2, 3]  # fmt: skip


async def test_chat_without_max_tokens_may_use_the_context_left(client_for):
    state, client = await client_for()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    request = state.scheduler.client.requests[-1]
    assert request.params.max_new_tokens == 2000 - len(request.input_ids)  # max_total_tokens


async def test_a_busy_port_is_one_clear_startup_error(smollm_dir, monkeypatch):
    """uvicorn exits the process (3) when it cannot bind; the router says which port instead."""
    import socket

    from common.config import RouterConfig
    from router import cli
    from router.startup import StartupError

    async def fake_state(config):
        return make_state(smollm_dir)

    monkeypatch.setattr(cli, "build_state", fake_state)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = RouterConfig("/tmp/x", str(smollm_dir), hostname="127.0.0.1", port=port)
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await asyncio.wait_for(cli.serve(config), 30)
