"""The routes managed platforms call (router/cloud_api.py: SageMaker's /invocations, Vertex
AI's /vertex), TGI's /ping, GET /, /chat_tokenize and /api-doc/openapi.json, in-process over
the fake shard (its text for two new tokens is " t1 t2")."""

from __future__ import annotations

import json

import pytest

from tests.test_router_app import client_for  # noqa: F401 - the fixture

TGI_BODY = {"inputs": "a b c", "parameters": {"max_new_tokens": 2}}
CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_ping_and_get_root_answer_as_health_without_the_key(client_for):  # noqa: F811
    state, client = await client_for(api_key="s3cret")
    for path in ("/ping", "/", "/health"):
        assert (await client.get(path)).status_code == 200, path
    state.scheduler.client.healthy = False
    for path in ("/ping", "/"):
        reply = await client.get(path)
        assert reply.status_code == 503 and reply.json()["error_type"] == "unhealthy", path
    # POST / generates: it still needs the key, as do the platforms' generation routes
    for path in ("/", "/invocations", "/vertex", "/chat_tokenize"):
        reply = await client.post(path, json=TGI_BODY)
        assert reply.status_code == 401, path


async def test_invocations_dispatch_by_the_body_fields(client_for):  # noqa: F811
    _, client = await client_for()
    tgi = await client.post("/invocations", json=TGI_BODY)
    assert tgi.status_code == 200 and tgi.json() == [{"generated_text": " t1 t2"}]
    chat = (await client.post("/invocations", json=CHAT_BODY)).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == " t1 t2"
    completion = (await client.post("/invocations", json={"prompt": "a b", "max_tokens": 2})).json()
    assert (
        completion["object"] == "text_completion" and completion["choices"][0]["text"] == " t1 t2"
    )
    stream = await client.post("/invocations", json={**TGI_BODY, "stream": True})
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
    assert events[-1]["generated_text"] == " t1 t2"


@pytest.mark.parametrize(
    "body,message",
    [
        ({"text": "hi"}, "needs `inputs`"),
        ({"inputs": 3}, "inputs"),  # the TGI schema's own check
        ({"messages": "hi"}, "messages"),
        ([1, 2], ""),  # not an object
    ],
)
async def test_invocations_refuse_what_fits_no_kind(client_for, body, message):  # noqa: F811
    _, client = await client_for()
    reply = await client.post("/invocations", json=body)
    assert reply.status_code == 422 and reply.json()["error_type"] == "validation"
    assert message in reply.json()["error"]


async def test_vertex_answers_each_instance_in_order(client_for):  # noqa: F811
    _, client = await client_for()
    instances = [TGI_BODY, CHAT_BODY, {"inputs": "x", "parameters": {"max_new_tokens": 1}}]
    reply = await client.post("/vertex", json={"instances": instances})
    assert reply.status_code == 200
    assert reply.json() == {"predictions": [" t1 t2", " t1 t2", " t1"]}


@pytest.mark.parametrize(
    "body,message",
    [
        ({"instances": []}, "non-empty"),
        ({}, "non-empty"),
        ({"instances": ["a"]}, "each instance must be a JSON object"),
        ({"instances": [{"inputs": "a", "parameters": {"temperature": -1}}]}, "temperature"),
        ({"instances": [TGI_BODY] * 5}, "at most 4"),
    ],
)
async def test_vertex_refusals_are_422(client_for, body, message):  # noqa: F811
    _, client = await client_for(max_client_batch_size=4)
    reply = await client.post("/vertex", json=body)
    assert reply.status_code == 422 and message in reply.json()["error"], reply.json()


async def test_chat_tokenize_returns_the_template_and_its_tokens(client_for):  # noqa: F811
    state, client = await client_for()
    reply = await client.post("/chat_tokenize", json=CHAT_BODY)
    assert reply.status_code == 200
    data = reply.json()
    templated = data["templated_text"]
    assert templated == state.chat_template.render([{"role": "user", "content": "hi"}])
    ids = state.validator.tokenizer.encode(templated, add_special_tokens=False).ids
    assert [t["id"] for t in data["tokenize_response"]] == ids
    for token in data["tokenize_response"]:
        assert templated[token["start"] : token["stop"]] == token["text"]
    empty = await client.post("/chat_tokenize", json={"messages": []})
    assert empty.status_code == 422


async def test_openapi_document_at_tgi_path(client_for):  # noqa: F811
    _, client = await client_for(api_key="s3cret")
    reply = await client.get("/api-doc/openapi.json")
    assert reply.status_code == 200
    paths = reply.json()["paths"]
    for path in ("/generate", "/invocations", "/vertex", "/chat_tokenize", "/ping"):
        assert path in paths, path


TIMING_HEADERS = ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time",
                  "x-time-per-token")  # fmt: skip


@pytest.mark.parametrize("path", ["/generate", "/", "/invocations"])
async def test_generation_replies_carry_tgi_timing_headers(client_for, path):  # noqa: F811
    state, client = await client_for()
    reply = await client.post(path, json=TGI_BODY)
    assert reply.status_code == 200
    headers = reply.headers
    assert headers["x-compute-type"] == "1-cpu"
    assert headers["x-compute-characters"] == str(len(TGI_BODY["inputs"]))
    expected_prompt = len(state.validator.tokenizer.encode(TGI_BODY["inputs"]).ids)
    assert headers["x-prompt-tokens"] == str(expected_prompt)
    assert headers["x-generated-tokens"] == "2"
    times = {name: int(headers[name]) for name in TIMING_HEADERS}
    assert all(value >= 0 for value in times.values())
    assert times["x-total-time"] >= times["x-inference-time"] >= times["x-time-per-token"]
    assert abs(float(headers["x-compute-time"]) * 1000 - times["x-total-time"]) <= 1
