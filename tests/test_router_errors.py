"""At least 30 malformed or invalid requests, each with its documented status and error_type;
the server keeps serving throughout."""

from __future__ import annotations

import json

import httpx
import pytest

G = "/generate"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def gen(**parameters):
    return {"inputs": "Hello", "parameters": parameters}


CASES = [
    (G, {}, 422, "validation"),
    (G, {"inputs": ""}, 422, "validation"),
    (G, gen(temperature=0), 422, "validation"),
    (G, gen(temperature=-1), 422, "validation"),
    (G, gen(top_p=1.5), 422, "validation"),
    (G, gen(top_p=0), 422, "validation"),
    (G, gen(top_k=0), 422, "validation"),
    (G, gen(top_k=-3), 422, "validation"),
    (G, gen(typical_p=2), 422, "validation"),
    (G, gen(repetition_penalty=0), 422, "validation"),
    (G, gen(frequency_penalty=3), 422, "validation"),
    (G, gen(max_new_tokens=0), 422, "validation"),
    (G, gen(max_new_tokens=5000), 422, "validation"),
    (G, gen(max_new_tokens=10**30), 422, "validation"),
    (G, gen(best_of=3, do_sample=True), 422, "validation"),
    (G, gen(best_of=2), 422, "validation"),
    (G, gen(best_of=2, do_sample=True, seed=1), 422, "validation"),
    (G, gen(stop=["a", "b", "c", "d", "e"]), 422, "validation"),
    (G, gen(top_n_tokens=10), 422, "validation"),
    (G, gen(truncate=0), 422, "validation"),
    (G, gen(truncate=5000), 422, "validation"),
    (G, gen(seed=-1), 422, "validation"),
    (G, gen(watermark=True), 422, "validation"),
    (G, gen(grammar={"type": "json", "value": {"type": "nope"}}), 422, "validation"),
    (G, gen(grammar={"type": "json", "value": "{not json"}), 422, "validation"),
    (G, gen(grammar={"type": "regex", "value": "(a|b"}), 422, "validation"),
    (G, gen(grammar={"type": "regex", "value": ""}), 422, "validation"),
    (G, gen(grammar={"type": "regex", "value": "[^\\s\\S]"}), 422, "validation"),  # matches nothing
    (G, gen(grammar={"type": "yaml", "value": "a"}), 422, "validation"),
    (G, gen(grammar={"type": "json_schema", "value": {"name": "x"}}), 422, "validation"),
    (G, gen(grammar="json"), 422, "validation"),
    (G, gen(adapter_id="lora"), 422, "validation"),
    (G, {"inputs": "word " * 2000}, 422, "validation"),
    (G, {"inputs": 42}, 422, "validation"),
    (G, {"inputs": "x", "parameters": "fast"}, 422, "validation"),
    (G, b"{not json", 400, "bad_request"),
    (G, b'{"inputs": "\xff\xfe"}', 400, "bad_request"),
    ("/generate_stream", gen(best_of=2, do_sample=True), 422, "validation"),
    ("/generate_stream", gen(decoder_input_details=True), 422, "validation"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, 422, "validation"),
    ("/tokenize", {}, 422, "validation"),
    (CHAT, {"messages": []}, 422, "validation"),
    (CHAT, {}, 422, "validation"),
    (CHAT, {"messages": MSG, "n": 5}, 422, "validation"),  # past --max-client-batch-size
    (CHAT, {"messages": MSG, "n": 0}, 422, "validation"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, 422, "validation"),
    (CHAT, {"messages": MSG, "presence_penalty": 3.0}, 422, "validation"),
    (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, 422, "validation"),
    (CHAT, {"messages": MSG, "logit_bias": {"10": 500}}, 422, "validation"),
    (CHAT, {"messages": MSG, "logit_bias": {"99999999": 1}}, 422, "validation"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 422, "validation"),
    (
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        422,
        "validation",
    ),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 422, "validation"),
    (
        CHAT,
        {"messages": MSG, "response_format": {"type": "regex", "value": "[a"}},
        422,
        "validation",
    ),
    (CHAT, {"messages": MSG, "response_format": "json"}, 422, "validation"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, 422, "validation"),
    (CHAT, {"messages": MSG, "max_tokens": -5}, 422, "validation"),
    ("/v1/completions", {"prompt": []}, 422, "validation"),
    ("/v1/completions", {"prompt": ["a"] * 5}, 422, "validation"),
    (G, b"x" * 2_100_000, 413, "payload_too_large"),
]


@pytest.mark.parametrize("path, body, status, error_type", CASES)
def test_invalid_request(server, path, body, status, error_type):
    if isinstance(body, bytes):
        reply = httpx.post(
            server.url + path,
            content=body,
            headers={"content-type": "application/json"},
            timeout=60,
        )
    else:
        reply = httpx.post(server.url + path, json=body, timeout=60)
    assert reply.status_code == status, reply.text
    payload = reply.json()
    assert payload["error_type"] == error_type
    assert isinstance(payload["error"], str) and payload["error"]


def test_wrong_content_type_is_415(server):
    reply = httpx.post(
        server.url + G, content=json.dumps(gen()), headers={"content-type": "text/plain"}
    )
    assert reply.status_code == 415 and reply.json()["error_type"] == "unsupported_media_type"


def test_serves_normally_after_the_bad_requests(server):
    reply = httpx.post(server.url + G, json=gen(max_new_tokens=3), timeout=60)
    assert reply.status_code == 200 and reply.json()["generated_text"]
    assert len(CASES) + 1 >= 30
