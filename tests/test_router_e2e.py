"""Real clients that no one here wrote, against real shard and router processes on SmolLM2."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import torch

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def reference(smollm_dir):
    """transformers' greedy continuation of the chat prompt and of a plain prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()

    def greedy(text: str, n: int) -> str:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=2,
        )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    return {"chat": greedy(chat, 24), "plain": greedy("The three primary colors are", 20)}


def test_text_generation_client(server, reference):
    from text_generation import Client

    client = Client(server.url, timeout=120)
    response = client.generate(
        "The three primary colors are",
        max_new_tokens=20,
        decoder_input_details=True,
        top_n_tokens=2,
    )
    assert response.generated_text == reference["plain"]
    details = response.details
    assert details.generated_tokens == 20 and details.finish_reason.value == "length"
    assert len(details.prefill) == 5 and details.prefill[0].logprob is None
    assert len(details.top_tokens) == 20 and len(details.top_tokens[0]) == 2
    streamed = list(client.generate_stream("The three primary colors are", max_new_tokens=20))
    assert "".join(r.token.text for r in streamed) == reference["plain"]
    assert streamed[-1].generated_text == reference["plain"]
    assert streamed[-1].details.generated_tokens == 20


def test_huggingface_hub_inference_client(server, reference):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url, timeout=120)
    assert (
        client.text_generation("The three primary colors are", max_new_tokens=20)
        == reference["plain"]
    )
    chunks = list(
        client.text_generation("The three primary colors are", max_new_tokens=20, stream=True)
    )
    assert "".join(chunks) == reference["plain"]
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat_completion(messages, max_tokens=24, temperature=0)
    assert (
        chat.choices[0].message.content == reference["chat"].strip()
        or chat.choices[0].message.content == reference["chat"]
    )
    stream = client.chat_completion(messages, max_tokens=24, temperature=0, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == chat.choices[0].message.content
    )


def test_openai_client(server, reference):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(
        model="x", messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2
    )
    assert chat.choices[0].message.content == reference["chat"]
    assert chat.usage.completion_tokens == len(chat.choices[0].logprobs.content)
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(
        model="x",
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["chat"]
    )
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    completion = client.completions.create(
        model="x", prompt="The three primary colors are", max_tokens=20, temperature=0
    )
    assert completion.choices[0].text == reference["plain"]
    many = client.completions.create(
        model="x", prompt=["The three primary colors are", "Hello"], max_tokens=5, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    streamed = client.completions.create(
        model="x", prompt="The three primary colors are", max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == reference["plain"]
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]


def test_stop_sequence_is_trimmed_for_openai_and_kept_for_tgi(server, reference):
    stop = reference["plain"].split()[2]
    tgi = httpx.post(
        server.url + "/generate",
        json={
            "inputs": "The three primary colors are",
            "parameters": {"max_new_tokens": 20, "stop": [stop], "details": True},
        },
        timeout=120,
    ).json()
    assert (
        tgi["generated_text"].endswith(stop) and tgi["details"]["finish_reason"] == "stop_sequence"
    )
    oai = httpx.post(
        server.url + "/v1/completions",
        json={
            "prompt": "The three primary colors are",
            "max_tokens": 20,
            "temperature": 0,
            "stop": stop,
        },
        timeout=120,
    ).json()
    assert oai["choices"][0]["text"] == tgi["generated_text"][: -len(stop)]
    assert oai["choices"][0]["finish_reason"] == "stop"


def test_sixteen_concurrent_equal_alone(server):
    prompts = [
        f"Question {i}: name a fruit that is {c}."
        for i, c in enumerate(["red", "yellow", "green", "orange"] * 4)
    ]

    def body(p):
        return {"inputs": p, "parameters": {"max_new_tokens": 12}}

    alone = [
        httpx.post(server.url + "/generate", json=body(p), timeout=120).json()["generated_text"]
        for p in prompts
    ]

    async def together():
        async with httpx.AsyncClient(timeout=300) as client:
            replies = await asyncio.gather(
                *(client.post(server.url + "/generate", json=body(p)) for p in prompts)
            )
        return [r.json()["generated_text"] for r in replies]

    assert asyncio.run(together()) == alone


def test_info_tokenize_metrics_docs(server):
    info = httpx.get(server.url + "/info").json()
    assert (
        info["max_input_tokens"] == 1500
        and info["max_total_tokens"] == 2048
        and info["model_dtype"] == "float32"
    )
    # pytgi's Info extensions (fields 100+), read from the shard after Warmup
    assert info["device_name"] == "cpu" and info["device_memory_used_bytes"] == 0
    assert info["kv_cache_blocks"] * info["block_size"] > info["max_supported_total_tokens"]
    assert info["kv_cache_bytes"] > 0 and info["cuda_graph_batch_sizes"] == []
    tokens = httpx.post(server.url + "/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["text"] for t in tokens] == ["Hello", " world"]
    metrics = httpx.get(server.url + "/metrics").text
    for name in [
        "tgi_request_count",
        "tgi_request_success",
        "tgi_request_duration_bucket",
        "tgi_request_queue_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_input_length",
        "tgi_request_generated_tokens",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_queue_size",
        'tgi_batch_forward_duration_bucket{le="0.005",method="prefill"}',
        "pytgi_request_time_to_first_token",
        "pytgi_kv_blocks_free",
        "pytgi_kv_blocks_used",
    ]:
        assert name in metrics, name
    assert server.metric("pytgi_kv_cache_bytes") == info["kv_cache_bytes"]
    capacity = server.metric("pytgi_kv_cache_capacity_tokens")
    assert capacity == info["max_supported_total_tokens"]
    assert server.metric("pytgi_device_memory_total_bytes") == 0
    assert server.metric("tgi_batch_max_total_tokens") == info["max_batch_total_tokens"] > 0
    # --prometheus-port: the same registry alone on its own port (TGI serves it on 9000)
    alone = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert alone.status_code == 200 and "tgi_batch_max_total_tokens" in alone.text
    assert httpx.get(f"http://127.0.0.1:{server.metrics_port}/generate").status_code == 404
    assert httpx.get(server.url + "/openapi.json").json()["paths"]["/generate"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_disconnected_streams_free_their_blocks(server):
    async def cut(n: int):
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(n):
                body = {
                    "inputs": "Tell me a long story.",
                    "parameters": {"max_new_tokens": 500, "ignore_eos": True},
                }
                async with client.stream(
                    "POST", server.url + "/generate_stream", json=body
                ) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            break  # hang up after the first token

    asyncio.run(cut(5))
    import time

    deadline = time.monotonic() + 30
    while server.metric("pytgi_kv_blocks_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("pytgi_kv_blocks_used") == 0
    assert (
        httpx.post(
            server.url + "/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
            timeout=60,
        ).status_code
        == 200
    )


def test_disconnected_non_streaming_request_is_cancelled(server):
    body = {
        "inputs": "Tell me a long story.",
        "parameters": {"max_new_tokens": 1000, "ignore_eos": True},
    }
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/generate", json=body, timeout=1.5)
    import time

    deadline = time.monotonic() + 30
    while server.metric("pytgi_kv_blocks_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("pytgi_kv_blocks_used") == 0
    assert server.metric("tgi_batch_current_size") == 0


def test_platform_routes_and_headers_on_real_processes(server):
    """SageMaker's, Vertex AI's and TGI's extra routes, and TGI's timing headers, served by
    a real router over a real shard (tests/test_cloud_routes.py covers their edge cases)."""
    url = server.url
    tgi = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "ignore_eos": True}}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    for path in ("/ping", "/"):
        assert httpx.get(url + path).status_code == 200, path
    invoked = httpx.post(url + "/invocations", json=tgi, timeout=60)
    generated = httpx.post(url + "/generate", json=tgi, timeout=60)
    assert invoked.status_code == generated.status_code == 200
    assert invoked.json() == [generated.json()]  # greedy: the same text by either route
    for name in ("x-compute-type", "x-total-time", "x-validation-time", "x-queue-time",
                 "x-inference-time", "x-time-per-token", "x-compute-characters"):  # fmt: skip
        assert name in invoked.headers and name in generated.headers, name
    assert generated.headers["x-generated-tokens"] == "3"
    assert generated.headers["x-compute-type"] == "1-cpu"
    chat_reply = httpx.post(url + "/invocations", json=chat, timeout=60).json()
    assert chat_reply["object"] == "chat.completion"
    vertex = httpx.post(url + "/vertex", json={"instances": [tgi, chat]}, timeout=60).json()
    assert vertex["predictions"][0] == generated.json()["generated_text"]
    assert vertex["predictions"][1] == chat_reply["choices"][0]["message"]["content"]
    tokens = httpx.post(url + "/chat_tokenize", json=chat, timeout=60).json()
    assert "Hi" in tokens["templated_text"] and tokens["tokenize_response"]
    assert "/vertex" in httpx.get(url + "/api-doc/openapi.json").json()["paths"]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Rome"]},
    },
    "required": ["name", "age", "city"],
}


def _check_person(text: str) -> None:
    import json

    import jsonschema

    jsonschema.validate(json.loads(text), PERSON)


def test_grammar_through_the_text_generation_client(server):
    """TGI's grammar: a JSON schema, then a streamed regex; the grammar's end ends the request."""
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    tgi = Client(server.url, timeout=120)
    prompt = "Describe a person as JSON:"
    reply = tgi.generate(prompt, max_new_tokens=100, grammar=Grammar(type=GrammarType.Json,
                                                                     value=PERSON))  # fmt: skip
    _check_person(reply.generated_text)
    assert reply.details.finish_reason.value == "eos_token"
    regex = Grammar(type=GrammarType.Regex, value=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
    streamed = list(tgi.generate_stream("Today's date:", max_new_tokens=20, grammar=regex))
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", streamed[-1].generated_text)


def test_structured_output_through_the_real_clients(server):
    """response_format through openai and huggingface_hub, streamed and not: every output
    parses and validates; the grammar's end ends the request."""
    import json

    from huggingface_hub import InferenceClient
    from openai import OpenAI

    check = _check_person
    messages = [{"role": "user", "content": "Give me a person as JSON."}]
    openai = OpenAI(base_url=server.url + "/v1", api_key="unused")
    schema_format = {"type": "json_schema",
                     "json_schema": {"name": "person", "schema": PERSON, "strict": True}}  # fmt: skip
    chat = openai.chat.completions.create(
        model="x", messages=messages, max_tokens=100, temperature=0, response_format=schema_format
    )
    check(chat.choices[0].message.content)
    assert chat.choices[0].finish_reason == "stop"
    stream = openai.chat.completions.create(
        model="x", messages=messages, max_tokens=100, temperature=0, stream=True,
        response_format=schema_format,
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        chat.choices[0].message.content
    )
    anything = openai.chat.completions.create(
        model="x", messages=messages, max_tokens=100, temperature=0.7, seed=3,
        response_format={"type": "json_object"},
    )  # fmt: skip
    content = anything.choices[0].message.content  # any object: it may run past max_tokens
    assert content.startswith("{")
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    hub = InferenceClient(model=server.url, timeout=120)
    out = hub.chat_completion(
        messages, max_tokens=100, temperature=0, response_format=schema_format
    )
    assert out.choices[0].message.content == chat.choices[0].message.content


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}  # fmt: skip


def test_tool_calls_through_the_real_clients(server):
    """tools with tool_choice required and named: OpenAI's tool_calls, streamed as OpenAI
    streams them; the call and the tool's answer go back in the next turn; a name that is
    not a tool is a 422; huggingface_hub's client reads the same call."""
    import json

    import jsonschema
    import openai as openai_module
    from huggingface_hub import InferenceClient
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    arguments_schema = WEATHER_TOOL["function"]["parameters"]
    reply = client.chat.completions.create(
        model="x", messages=messages, max_tokens=60, temperature=0, tools=[WEATHER_TOOL],
        tool_choice="required",
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), arguments_schema)
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model="x", messages=messages, max_tokens=60, temperature=0, tools=[WEATHER_TOOL],
        tool_choice=named, stream=True,
    )  # fmt: skip
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    streamed = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(streamed) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow_up = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model="x", messages=follow_up, max_tokens=20, temperature=0, tools=[WEATHER_TOOL],
        tool_choice="none",
    )  # fmt: skip
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    with pytest.raises(openai_module.UnprocessableEntityError):
        client.chat.completions.create(
            model="x", messages=messages, max_tokens=10, tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_stock"}},
        )  # fmt: skip
    hub = InferenceClient(model=server.url, timeout=120)
    out = hub.chat_completion(messages, max_tokens=60, temperature=0, tools=[WEATHER_TOOL],
                              tool_choice="required")  # fmt: skip
    hub_call = out.choices[0].message.tool_calls[0]
    assert hub_call.function.name == "get_weather"
    hub_arguments = hub_call.function.arguments  # OpenAI's JSON string (TGI sent an object)
    assert json.loads(hub_arguments) == json.loads(call.function.arguments)


def test_logit_bias_and_presence_penalty_through_the_openai_client(server, smollm_dir):
    from openai import OpenAI
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))
    forced = tokenizer.token_to_id("Ġbanana")
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model="x", messages=messages, max_tokens=3, temperature=0, logit_bias={str(forced): 100}
    )
    assert reply.choices[0].message.content == " banana banana banana"
    penalised = client.chat.completions.create(
        model="x", messages=messages, max_tokens=3, temperature=0, logit_bias={str(forced): 100},
        presence_penalty=2.0,
    )  # fmt: skip
    assert penalised.choices[0].message.content == " banana banana banana"  # +100 outweighs -2
    plain = client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=2, temperature=0,
        logit_bias={str(forced): -100, str(tokenizer.token_to_id("ĠParis")): -100},
    )  # fmt: skip
    assert "Paris" not in plain.choices[0].text


def test_streamed_completions_honour_logprobs_and_echo(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    options = dict(model="x", prompt="The three primary colors are", max_tokens=6,
                   temperature=0, logprobs=2, echo=True)  # fmt: skip
    whole = client.completions.create(**options).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**options, stream=True)]
    assert "".join(c.text for c in chunks) == whole.text
    assert whole.text.startswith("The three primary colors are")
    tokens = [t for c in chunks for t in c.logprobs.tokens]
    assert tokens == whole.logprobs.tokens
    streamed = [x for c in chunks for x in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert [x for c in chunks for x in c.logprobs.text_offset] == whole.logprobs.text_offset
    assert all(len(top) == 2 for c in chunks for top in c.logprobs.top_logprobs)


def test_n_choices_share_the_prompt_blocks(server):
    """n = 3: the second and third choices read the first one's cached prompt."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    before = server.metric("pytgi_prefix_cache_hits")
    prompt = "Write one sentence about the sea, the wind and the stars over the harbour tonight."
    reply = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": prompt}], max_tokens=8,
        temperature=0.9, seed=11, n=3,
    )  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # their own seeds
    assert reply.usage.completion_tokens == 24
    assert server.metric("pytgi_prefix_cache_hits") - before >= 2
