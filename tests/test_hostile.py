"""One request can never hurt another: hostile bodies against real processes (router and
shard, tiny model) while ordinary requests run; every ordinary request is unharmed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import Server

STEADY = 20
STEADY_TOKENS = 48
BIG = "The quick brown fox jumps over the lazy dog. " * 42_000  # ~1.9 MB, under the limit


def _gen(**parameters) -> dict:
    return {"inputs": "hostile", "parameters": {"max_new_tokens": 8, **parameters}}


def _chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **fields}


# (route, body): each once failed every request running beside it, or froze the router
HOSTILE = [
    ("/generate", _gen(stop=["\ud800"])),
    ("/generate_stream", _gen(stop=["ok", "\udfff"])),
    ("/generate", _gen(top_k=2**32)),
    ("/generate", _gen(top_p=1e-50)),
    ("/generate", _gen(temperature=1e39)),
    ("/generate", _gen(temperature=1e-38, do_sample=True)),
    ("/generate", _gen(repetition_penalty=1e39)),
    ("/generate", _gen(typical_p=1e-50)),
    ("/generate", _gen(top_n_tokens=2**32)),
    ("/generate", _gen(max_new_tokens=2**32 + 4)),
    ("/generate", {"inputs": "a \ud800 b", "parameters": {"max_new_tokens": 4}}),
    ("/v1/chat/completions", _chat(temperature=1e39)),
    ("/v1/chat/completions", _chat(top_p=1e-50)),
    ("/v1/chat/completions", _chat(stop=["\ud800"], stream=True)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x \udc00"}]}),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"], "max_tokens": 4}),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**40, "max_tokens": 4}),
    ("/tokenize", {"inputs": "\ud800"}),
]


@pytest.fixture(scope="module")
def hostile_server(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    srv = Server(
        tiny_model_dir,
        workdir,
        router_args=[
            "--max-total-tokens",
            "1024",
            "--max-input-tokens",
            "512",
            "--max-concurrent-requests",
            "128",
        ],  # fmt: skip
    )
    yield srv
    srv.stop()


async def _poll_health_until(client: httpx.AsyncClient, work: asyncio.Future) -> list[float]:
    """Seconds each /health took, polled every 100 ms until `work` is done."""
    polls = []
    while not work.done():
        started = time.monotonic()
        assert (await client.get("/health")).status_code == 200
        polls.append(time.monotonic() - started)
        await asyncio.sleep(0.1)
    return polls


async def _steady_stream(client: httpx.AsyncClient, i: int) -> list[int]:
    body = {
        "inputs": f"steady request number {i}",
        "parameters": {"max_new_tokens": STEADY_TOKENS, "ignore_eos": True},
    }
    ids = []
    async with client.stream("POST", "/generate_stream", json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                assert "error" not in event, event
                ids.append(event["token"]["id"])
    return ids


def _post(client: httpx.AsyncClient, route: str, body: dict):
    """JSON with \\u escapes (ASCII), so lone surrogates travel as clients send them."""
    content = json.dumps(body)
    return client.post(route, content=content, headers={"content-type": "application/json"})


async def _steady_with(url: str, hostile) -> tuple[list[list[int]], list[httpx.Response]]:
    """The steady streams, with `hostile` requests sent once they all run."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        streams = [asyncio.ensure_future(_steady_stream(client, i)) for i in range(STEADY)]
        await asyncio.sleep(0.3)
        replies = await asyncio.gather(*(_post(client, r, b) for r, b in hostile))
        return await asyncio.gather(*streams), replies


def test_hostile_values_get_422_and_running_streams_keep_their_tokens(hostile_server):
    expected, _ = asyncio.run(_steady_with(hostile_server.url, []))
    assert all(len(ids) == STEADY_TOKENS for ids in expected)
    got, replies = asyncio.run(_steady_with(hostile_server.url, HOSTILE))
    for (route, body), reply in zip(HOSTILE, replies, strict=True):
        assert reply.status_code == 422, (route, body, reply.text[:200])
        assert reply.json()["error_type"] == "validation"
    assert got == expected
    assert hostile_server.metric("pytgi_kv_blocks_used") == 0


def test_huge_stop_sequences_are_refused_and_the_largest_allowed_never_stall(hostile_server):
    url = hostile_server.url
    huge = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "stop": ["s" * 450_000 + str(i) for i in range(4)]}  # fmt: skip
    started = time.monotonic()
    reply = httpx.post(url + "/v1/completions", json=huge, timeout=60)
    assert reply.status_code == 422 and "1024 characters" in reply.json()["error"]
    assert time.monotonic() - started < 5

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            stop = ["ab" * 511 + "c", "ba" * 511 + "c", " " * 1023 + "z", "q" * 1024]
            bodies = [
                {"prompt": f"p{i}", "max_tokens": 400, "ignore_eos": True, "stream": True,
                 "stop": stop}
                for i in range(4)
            ]  # fmt: skip
            work = asyncio.ensure_future(
                asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            )
            polls = await _poll_health_until(client, work)
            return await work, polls

    replies, polls = asyncio.run(go())
    assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in replies)
    assert len(polls) >= 5 and max(polls) < 1.0, max(polls)
    print("slowest health poll", max(polls))


def test_payload_limit_prompts_in_one_batch_and_tokenize_keep_the_router_answering(
    hostile_server,
):
    """Four ~1.9 MB prompts truncated to 16 tokens (one Prefill far over gRPC's 4 MiB
    default) and a ~1.9 MB /tokenize, while /health is polled: all succeed, no poll stalls."""
    url = hostile_server.url

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=180) as client:
            body = {"inputs": BIG, "parameters": {"truncate": 16, "max_new_tokens": 4}}
            work = asyncio.ensure_future(
                asyncio.gather(
                    *(client.post("/generate", json=body) for _ in range(4)),
                    client.post("/tokenize", json={"inputs": BIG}),
                )
            )
            polls = await _poll_health_until(client, work)
            return await work, polls

    replies, polls = asyncio.run(go())
    assert [r.status_code for r in replies] == [200] * 5, [r.text[:200] for r in replies]
    assert len(replies[-1].json()) == 420_001  # 42,000 x 10 tokens and the last space
    print("slowest health poll", max(polls))
    assert max(polls) < 1.0, polls


def test_a_client_that_stops_reading_loses_its_stream_and_connections_are_bounded(
    tiny_model_dir, tmp_path
):
    """One slot; a client asks for a stream of ~7 KB events (100 alternatives per token) and
    reads none of it. Once the socket buffers are full the router's sends block; after
    --client-timeout the stream is cut, the request cancelled and the slot serves others."""
    import socket

    srv = Server(
        tiny_model_dir,
        tmp_path,
        router_args=["--max-total-tokens", "1024", "--max-input-tokens", "64",
                     "--max-concurrent-requests", "1", "--client-timeout", "2",
                     "--max-top-n-tokens", "100", "--max-connections", "4"],
    )  # fmt: skip
    try:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", srv.port))
        body = json.dumps(
            {"inputs": "x", "parameters": {"max_new_tokens": 950, "ignore_eos": True,
                                           "top_n_tokens": 100}}
        ).encode()  # fmt: skip
        stuck.sendall(
            b"POST /generate_stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        started, status = time.monotonic(), 429
        small = {"inputs": "y", "parameters": {"max_new_tokens": 1}}
        while status == 429 and time.monotonic() - started < 60:
            time.sleep(0.25)
            status = httpx.post(srv.url + "/generate", json=small, timeout=30).status_code
        assert status == 200  # the slot came back
        received = b""
        stuck.settimeout(10)
        while chunk := stuck.recv(1 << 20):
            received += chunk
        stuck.close()
        events = received.count(b"\ndata:") + received.startswith(b"data:")
        assert 0 < events < 950 and b'"finish_reason"' not in received  # cut, not finished
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
        assert httpx.get(srv.url + "/info").status_code == 503  # --max-connections reached
        for connection in idle:
            connection.close()
        time.sleep(0.5)
        assert httpx.get(srv.url + "/info").status_code == 200
    finally:
        srv.stop()
