"""Every metric TGI's router exports is in /metrics under its name, so TGI's Grafana dashboard
reads pytgi unchanged; each moves when its event happens. In-process over the fake shard."""

from __future__ import annotations

import re

from tests.test_router_app import client_for  # noqa: F401 - the fixture

# TGI's metrics (router/src and backends/v3/src of text-generation-inference, read
# 2026-11-28): name -> its kind there, which is also its exposed type here (counters under
# their plain names, as TGI's exporter writes them, not prometheus-client's `..._total`).
TGI_METRICS = {
    "tgi_request_count": "counter",
    "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
    "tgi_request_duration": "histogram",
    "tgi_request_validation_duration": "histogram",
    "tgi_request_queue_duration": "histogram",
    "tgi_request_inference_duration": "histogram",
    "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_input_length": "histogram",
    "tgi_request_max_new_tokens": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_request_skipped_tokens": "histogram",
    "tgi_batch_concat": "counter",
    "tgi_batch_concat_duration": "histogram",
    "tgi_batch_current_size": "gauge",
    "tgi_batch_current_max_tokens": "gauge",
    "tgi_batch_max_total_tokens": "gauge",
    "tgi_batch_next_size": "histogram",
    "tgi_batch_inference_count": "counter",
    "tgi_batch_inference_success": "counter",
    "tgi_batch_inference_failure": "counter",
    "tgi_batch_forward_duration": "histogram",
    "tgi_batch_decode_duration": "histogram",
    "tgi_batch_filter_duration": "histogram",
    "tgi_batch_inference_duration": "histogram",
    "tgi_queue_size": "gauge",
}


def _types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match, sample
    return float(match.group(1))


async def test_every_tgi_metric_is_exported_with_its_kind(client_for):  # noqa: F811
    _, client = await client_for()
    types = _types((await client.get("/metrics")).text)
    for name, kind in TGI_METRICS.items():
        assert types.get(name) == kind, (name, types.get(name))


def test_counters_are_written_as_tgi_writes_them():
    from router.metrics import Metrics

    metrics = Metrics()
    metrics.request_count.inc()
    metrics.request_failure.labels('odd"type').inc(2)
    text = metrics.render().decode()
    assert "# TYPE tgi_request_count counter\ntgi_request_count 1.0\n" in text
    assert 'tgi_request_failure{err="odd\\"type"} 2.0' in text
    assert not re.search(r"^\w+_total[{ ]", text, re.M)  # no prometheus-client counter names
    assert text.count("# TYPE tgi_request_count ") == 1


async def test_the_new_metrics_move_with_their_events(client_for):  # noqa: F811
    _, client = await client_for()
    body = {"inputs": "a b c", "parameters": {"max_new_tokens": 3}}
    assert (await client.post("/generate", json=body)).status_code == 200
    text = (await client.get("/metrics")).text
    assert _value(text, "tgi_request_validation_duration_count") == 1
    assert _value(text, "tgi_request_max_new_tokens_count") == 1
    assert _value(text, "tgi_request_max_new_tokens_sum") == 3
    assert _value(text, "tgi_request_skipped_tokens_count") == 1
    assert _value(text, "tgi_batch_next_size_count") == 1
    assert _value(text, 'tgi_batch_inference_success{method="prefill"}') == 1
    assert _value(text, 'tgi_batch_inference_success{method="decode"}') == 2
    assert 'tgi_batch_inference_failure{method="decode"}' not in text


async def test_joins_filters_and_failed_steps_are_counted(client_for):  # noqa: F811
    import asyncio

    state, client = await client_for()
    long = {"inputs": "a b c", "parameters": {"max_new_tokens": 200}}
    short = {"inputs": "d e", "parameters": {"max_new_tokens": 2}}
    running = asyncio.ensure_future(client.post("/generate", json=long))
    while not state.scheduler.running:  # the long request is in the running batch
        await asyncio.sleep(0.001)
    assert (await client.post("/generate", json=short)).status_code == 200  # joins, leaves
    assert (await running).status_code == 200
    text = (await client.get("/metrics")).text
    assert _value(text, 'tgi_batch_concat{reason="backpressure"}') >= 1
    assert _value(text, "tgi_batch_next_size_count") == 2
    assert _value(text, 'tgi_batch_filter_duration_count{method="decode"}') >= 1
    state.scheduler.client.fail_on.add("decode")
    failed = await client.post("/generate", json=short)
    assert failed.status_code == 424
    text = (await client.get("/metrics")).text
    assert _value(text, 'tgi_batch_inference_failure{method="decode"}') == 1


async def test_the_prometheus_port_app_serves_metrics_only():
    import httpx

    from router.app import create_metrics_app
    from router.metrics import Metrics

    metrics = Metrics()
    metrics.request_count.inc()
    transport = httpx.ASGITransport(app=create_metrics_app(metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
        reply = await client.get("/metrics")
        assert reply.status_code == 200 and "tgi_request_count 1.0" in reply.text
        assert (await client.get("/health")).status_code == 404
        assert (await client.post("/metrics", json={})).status_code == 404


def test_a_prometheus_port_in_use_fails_the_start():
    import socket

    import pytest

    from common.config import RouterConfig
    from router.cli import start_metrics_server
    from router.startup import StartupError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = RouterConfig("uds", "tok", hostname="127.0.0.1", prometheus_port=port)
        with pytest.raises(StartupError, match=f"127.0.0.1:{port} for --prometheus-port"):
            start_metrics_server(None, config)
