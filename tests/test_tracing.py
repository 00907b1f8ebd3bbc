"""OpenTelemetry traces across both processes, received by a loopback OTLP collector: one
/generate (sent inside a caller's trace) yields FastAPI's server span under the caller's, our
validation / queue / infer spans under its handler's, batch spans linked to that, and the
shard's Prefill and Decode spans as children of the router's batch spans."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import Server

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span as (service name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, service: str, name: str) -> list:
        with self.lock:
            return [s for svc, s in self.spans if svc == service and s.name == name]


@pytest.fixture
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.endpoint = f"http://127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def test_one_request_yields_the_span_tree_across_router_and_shard(
    collector, smollm_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    endpoint = collector.endpoint
    server = Server(
        smollm_dir,
        tmp_path,
        router_args=("--otlp-endpoint", endpoint),
        shard_args=("--otlp-endpoint", endpoint),
    )
    try:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        reply = httpx.post(
            server.url + "/generate", json=body, headers={"traceparent": traceparent}, timeout=60
        )
        assert reply.status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            collector.named("pytgi.router", "infer") and collector.named("pytgi.shard", "Decode")
        ):
            time.sleep(0.2)
    finally:
        server.stop()
    # FastAPI's own server span, under the caller's; the handler's span under it
    [server_span] = collector.named("pytgi.router", "POST /generate")
    assert server_span.trace_id.hex() == CALLER_TRACE
    assert server_span.parent_span_id.hex() == CALLER_SPAN
    [request] = [  # (GET /health, polled at start-up, has its own)
        s
        for s in collector.named("pytgi.router", "fastapi.endpoint")
        if s.parent_span_id == server_span.span_id
    ]
    for name in ("validation", "queue", "infer"):
        [child] = collector.named("pytgi.router", name)
        assert child.trace_id == request.trace_id and child.parent_span_id == request.span_id
    [queue] = collector.named("pytgi.router", "queue")
    [infer] = collector.named("pytgi.router", "infer")
    assert request.start_time_unix_nano <= queue.start_time_unix_nano <= infer.start_time_unix_nano
    assert infer.end_time_unix_nano <= request.end_time_unix_nano + 5_000_000
    for method in ("prefill", "decode"):
        batches = collector.named("pytgi.router", method)
        assert batches, method
        for batch in batches:  # a batch is its own trace, linked to the requests it serves
            assert [link.span_id for link in batch.links] == [request.span_id]
            shard_spans = [
                s
                for s in collector.named("pytgi.shard", method.capitalize())
                if s.parent_span_id == batch.span_id
            ]
            assert len(shard_spans) == 1 and shard_spans[0].trace_id == batch.trace_id
    assert len(collector.named("pytgi.router", "decode")) == 2  # 3 tokens: prefill + 2 steps
