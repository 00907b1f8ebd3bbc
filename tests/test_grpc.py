"""Every RPC through a real grpc.aio channel on a Unix socket, errors included."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from common.config import ShardConfig
from common.pb import pb, pb_grpc
from shard.engine import ShardEngine
from shard.server import ErrorInterceptor, TextGenerationService


def _request(request_id: int, text: str, max_new: int = 4, **fields) -> pb.Request:
    params = fields.pop(
        "parameters",
        pb.NextTokenChooserParameters(
            temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0
        ),
    )
    return pb.Request(
        id=request_id,
        inputs=text,
        parameters=params,
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=max_new, ignore_eos_token=True
        ),
        **fields,
    )


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ShardEngine(ShardConfig(model_dir=str(tiny_model_dir), kv_cache_memory=64 << 20))


@pytest.fixture
async def stub(engine, tmp_path):
    config = ShardConfig(
        model_dir=engine.config.model_dir, uds_path=str(tmp_path / "s"), world_size=1
    )
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    pb_grpc.add_TextGenerationServiceServicer_to_server(
        TextGenerationService(engine, config), server
    )
    server.add_insecure_port(config.url)
    await server.start()
    async with grpc.aio.insecure_channel(config.url) as channel:
        yield pb_grpc.TextGenerationServiceStub(channel)
    await server.stop(None)


async def test_every_rpc(stub, tmp_path):
    await stub.Health(pb.HealthRequest())
    urls = await stub.ServiceDiscovery(pb.ServiceDiscoveryRequest())
    assert list(urls.urls) == [f"unix://{tmp_path / 's'}-0"]
    info = await stub.Info(pb.InfoRequest())
    assert (info.dtype, info.device_type, info.block_size) == ("float32", "cpu", 16)
    assert info.support_chunking and info.use_prefix_caching and not info.requires_padding
    assert info.attention_impl == "reference"
    warm = await stub.Warmup(
        pb.WarmupRequest(
            batch=pb.Batch(id=0, requests=[_request(0, "warm up " * 20)]),
            max_input_tokens=500,
            max_prefill_tokens=512,
            max_total_tokens=1000,
        )
    )
    assert warm.max_input_tokens == 500 and warm.max_total_tokens == 1000
    assert warm.max_supported_total_tokens > 1000
    await stub.ClearCache(pb.ClearCacheRequest())

    batch = pb.Batch(
        id=1,
        requests=[
            _request(1, "Hello there", top_n_tokens=2, prefill_logprobs=True),
            _request(2, "Bonjour", 2),
        ],
        size=2,
    )
    pre = await stub.Prefill(pb.PrefillRequest(batch=batch))
    assert pre.HasField("batch") and list(pre.batch.request_ids) == [1, 2]
    assert pre.forward_ns > 0 and pre.total_ns >= pre.forward_ns and not pre.HasField("concat_ns")
    gen = {g.request_id: g for g in pre.generations}
    assert len(gen[1].prefill_tokens.ids) == len(gen[1].prefill_tokens.logprobs) > 0
    assert len(gen[1].top_tokens) == 1 and len(gen[1].top_tokens[0].ids) == 2
    assert pre.batch.current_tokens == 2 and pre.batch.max_tokens == 2 * 16

    second = await stub.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=2, requests=[_request(3, "Hola", 6)], size=1))
    )
    dec = await stub.Decode(pb.DecodeRequest(batches=[pre.batch, second.batch]))
    assert dec.HasField("concat_ns") and sorted(dec.batch.request_ids) == [1, 2, 3]
    finished = [g.request_id for g in dec.generations if g.HasField("generated_text")]
    assert finished == [2]
    assert dec.generations[1].generated_text.finish_reason == pb.FINISH_REASON_LENGTH
    filtered = await stub.FilterBatch(
        pb.FilterBatchRequest(batch_id=dec.batch.id, request_ids=[1, 3])
    )
    assert list(filtered.batch.request_ids) == [1, 3]
    await stub.ClearCache(pb.ClearCacheRequest(id=dec.batch.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Decode(pb.DecodeRequest(batches=[filtered.batch]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


BAD = [
    (_request(10, ""), "input is empty"),
    (_request(11, "hi", 40, blocks=[1]), "blocks"),
    (
        _request(
            12, "hi", parameters=pb.NextTokenChooserParameters(do_sample=True, temperature=0.0)
        ),
        "temperature",
    ),
    (
        _request(
            13,
            "hi",
            parameters=pb.NextTokenChooserParameters(
                temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, watermark=True
            ),
        ),
        "watermark",
    ),
    (
        _request(
            14,
            "hi",
            parameters=pb.NextTokenChooserParameters(
                temperature=1.0,
                top_p=1.0,
                typical_p=1.0,
                repetition_penalty=1.0,
                grammar="(a|b",
                grammar_type=pb.GRAMMAR_TYPE_REGEX,
            ),
        ),
        "unclosed group",
    ),
    (_request(15, "hi", adapter_id="lora"), "adapter"),
    (
        _request(
            16,
            "",
            input_chunks=pb.Input(
                chunks=[pb.InputChunk(image=pb.Image(data=b"x", mimetype="image/png"))]
            ),
        ),
        "image",
    ),
    (
        _request(
            17,
            "hi",
            parameters=pb.NextTokenChooserParameters(
                temperature=1.0, top_p=0.0, typical_p=1.0, repetition_penalty=1.0
            ),
        ),
        "top_p",
    ),
]


@pytest.mark.parametrize("request_pb, message", BAD)
async def test_a_bad_request_is_refused_alone_and_shard_keeps_serving(stub, request_pb, message):
    await stub.Warmup(pb.WarmupRequest(max_prefill_tokens=64, max_total_tokens=1000))
    good = _request(21, "fine", 1)
    reply = await stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=7, requests=[request_pb, good])))
    assert [r.request_id for r in reply.refused] == [request_pb.id]
    assert message in reply.refused[0].message
    assert [g.request_id for g in reply.generations] == [21]
    assert reply.generations[0].generated_text.generated_tokens == 1
    ok = await stub.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=8, requests=[_request(20, "still alive", 1)]))
    )
    assert ok.generations[0].generated_text.generated_tokens == 1


async def test_prefill_before_warmup_is_failed_precondition(tiny_model_dir, tmp_path):
    engine = ShardEngine(ShardConfig(model_dir=str(tiny_model_dir)))
    service = TextGenerationService(engine, engine.config)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    pb_grpc.add_TextGenerationServiceServicer_to_server(service, server)
    url = f"unix://{tmp_path}/cold-0"
    server.add_insecure_port(url)
    await server.start()
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prefill(
                pb.PrefillRequest(batch=pb.Batch(id=1, requests=[_request(1, "hi")]))
            )
    await server.stop(None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Warmup" in err.value.details()


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "shard did not start"
        time.sleep(0.2)


def test_process_serves_then_sigterm_removes_socket(tiny_model_dir, tmp_path):
    uds = str(tmp_path / "proc")
    cmd = [
        sys.executable,
        "-m",
        "shard.cli",
        "serve",
        str(tiny_model_dir),
        "--uds-path",
        uds,
        "--kv-cache-memory",
        "32MiB",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        _wait_for(f"{uds}-0", proc)
        assert oct(os.stat(f"{uds}-0").st_mode & 0o777) == "0o600"

        async def talk():
            async with grpc.aio.insecure_channel(f"unix://{uds}-0") as channel:
                stub = pb_grpc.TextGenerationServiceStub(channel)
                await stub.Health(pb.HealthRequest())
                await stub.Warmup(pb.WarmupRequest(max_prefill_tokens=32, max_total_tokens=512))
                return await stub.Prefill(
                    pb.PrefillRequest(batch=pb.Batch(id=1, requests=[_request(1, "hi", 1)]))
                )

        assert asyncio.run(talk()).generations[0].HasField("generated_text")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(f"{uds}-0")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "has no config.json"),
    ],
)
def test_process_start_errors_are_one_line(tmp_path, setup, message):
    target = setup(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shard.cli",
            "serve",
            str(target),
            "--uds-path",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


async def _serve(engine, tmp_path, secret=None):
    from shard.server import build_server

    config = ShardConfig(model_dir=engine.config.model_dir, uds_path=str(tmp_path / "b"))
    server = build_server(TextGenerationService(engine, config), secret)
    server.add_insecure_port(config.url)
    await server.start()
    return server, config.url


async def test_a_prefill_far_over_4_mib_passes(engine, tmp_path):
    """Three prompts at the HTTP payload limit (~1.9 MB each, truncated to a few tokens): the
    Prefill message is ~5.7 MB, over gRPC's 4 MiB default on both ends."""
    from router.client import ShardedClient
    from router.types import Params, ShardRequest

    engine.warmup([], None, 64, 1000)
    server, url = await _serve(engine, tmp_path)
    client = ShardedClient([url])
    try:
        text = "word " * 380_000
        params = Params(max_new_tokens=2, ignore_eos=True, truncate=8)
        requests = [ShardRequest(i, text, params, [], 16) for i in range(3)]
        step = await client.prefill(1, requests, None)
        assert sorted(g.request_id for g in step.generations) == [0, 1, 2]
        await client.clear_cache(None)
    finally:
        await client.close()
        await server.stop(None)


async def test_with_a_secret_every_call_needs_it(engine, tmp_path):
    from router.client import ShardedClient

    server, url = await _serve(engine, tmp_path, secret="s3cret")
    try:
        for secret in (None, "wrong", "s3cret"):
            client = ShardedClient([url], secret)
            try:
                await client.health()
                await client.info()
                outcome = "OK"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            finally:
                await client.close()
            assert outcome == ("OK" if secret == "s3cret" else "UNAUTHENTICATED"), secret
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ShardedClient.connect(url, "wrong")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await ShardedClient.connect(url, "s3cret")).urls
    finally:
        await server.stop(None)


def _self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key (openssl, on every machine of this project)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


async def test_the_tcp_port_speaks_tls_when_given_a_certificate(engine, tmp_path):
    """Multi-node ports: with a certificate only TLS clients that trust it get through."""
    from router.client import ShardedClient
    from shard.server import add_tcp_port, build_server
    from tests.conftest import free_port

    cert, key = _self_signed(tmp_path)
    port = free_port()
    config = ShardConfig(
        model_dir=engine.config.model_dir, grpc_host="127.0.0.1", grpc_port_base=port,
        tls_cert_file=cert, tls_key_file=key,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    server = build_server(TextGenerationService(engine, config, [address]), "s")
    add_tcp_port(server, config)
    await server.start()
    try:
        trusted = await ShardedClient.connect(address, "s", (tmp_path / "cert.pem").read_bytes())
        await trusted.health()
        await trusted.close()
        (tmp_path / "other").mkdir()
        for tls_ca in (None, _self_signed(tmp_path / "other")[0]):
            client = ShardedClient([address], "s", tls_ca and open(tls_ca, "rb").read())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.health(timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await client.close()
    finally:
        await server.stop(None)
