"""OpenTelemetry traces, exported over OTLP (gRPC) when --otlp-endpoint is given.

Without an endpoint nothing is configured and every span is OpenTelemetry's no-op one. The
trace context crosses from router to shard in gRPC metadata (W3C `traceparent`), as TGI's
does, so a batch's router span is the parent of the shards' spans for that call.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.context import Context


def setup_tracing(service_name: str, endpoint: str | None) -> None:
    """Exports this process's spans to `endpoint` (e.g. http://127.0.0.1:4317) as
    `service_name`; batched in the background, flushed at exit."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def context_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata pairs (none outside a recorded span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context from gRPC metadata (an empty context when it sent none)."""
    carrier = {k: v if isinstance(v, str) else v.decode() for k, v in metadata or ()}
    return propagate.extract(carrier)


def epoch_ns(monotonic_seconds: float) -> int:
    """A `time.monotonic()` reading as the wall-clock nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_seconds) * 1e9)
