"""Prometheus metrics under TGI's names, plus pytgi's own (time to first token, KV blocks).

TGI's counters are exposed as TGI exposes them: type counter, under their plain names
(`tgi_request_count 3`). prometheus-client would name a counter's samples `..._total`, which
TGI's dashboards do not query, so these are kept in unregistered gauges and written out by
`_counter_text`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from router.entry import Entry
from router.types import CachedBatch, ShardInfo, StepOut

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _counter_text(counters: list[Gauge]) -> bytes:
    """Text exposition (0.0.4) of `counters` as type counter, samples under the plain name."""
    lines = []
    for counter in counters:
        for family in counter.collect():
            lines.append(f"# HELP {family.name} {family.documentation}")
            lines.append(f"# TYPE {family.name} counter")
            for sample in family.samples:
                labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sample.labels.items())
                lines.append(f"{sample.name}{{{labels}}} {sample.value!r}" if labels
                             else f"{sample.name} {sample.value!r}")  # fmt: skip
    return ("\n".join(lines) + "\n").encode() if lines else b""


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._counters: list[Gauge] = []
        self.request_count = self._counter("tgi_request_count", "Requests received")
        self.request_success = self._counter("tgi_request_success", "Requests that succeeded")
        self.request_failure = self._counter("tgi_request_failure", "Failed requests", ["err"])
        self.request_duration = Histogram(
            "tgi_request_duration", "End-to-end seconds", buckets=_DURATION_BUCKETS, registry=r
        )
        self.queue_duration = Histogram(
            "tgi_request_queue_duration", "Seconds queued", buckets=_DURATION_BUCKETS, registry=r
        )
        self.inference_duration = Histogram(
            "tgi_request_inference_duration",
            "Seconds in batches",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean seconds per output token",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_size = Gauge(
            "tgi_batch_current_size", "Requests in the running batch", registry=r
        )
        self.batch_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "KV tokens of the running batch", registry=r
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=r)
        self.forward_duration = Histogram(
            "tgi_batch_forward_duration",
            "Shard forward seconds",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.decode_duration = Histogram(
            "tgi_batch_decode_duration",
            "Shard token choice seconds",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_inference_duration = Histogram(
            "tgi_batch_inference_duration",
            "Whole step seconds",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_inference_count = self._counter(
            "tgi_batch_inference_count", "Steps run", ["method"]
        )
        self._add_batch_outcomes(r)
        self.ttft = Histogram(
            "pytgi_request_time_to_first_token",
            "Seconds to first token",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._add_cache_gauges(r)

    def _add_batch_outcomes(self, r: CollectorRegistry) -> None:
        """TGI's step outcomes, batch shapes and validation (its Grafana dashboard's panels)."""
        self.batch_success = self._counter(
            "tgi_batch_inference_success", "Steps that succeeded", ["method"]
        )
        self.batch_failure = self._counter(
            "tgi_batch_inference_failure", "Steps that failed", ["method"]
        )
        self.filter_duration = Histogram(
            "tgi_batch_filter_duration",
            "FilterBatch seconds",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_concat = self._counter(
            "tgi_batch_concat", "New requests joined to the running batch", ["reason"]
        )
        self.concat_duration = Histogram(
            "tgi_batch_concat_duration",
            "Shard seconds joining batches",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "KV token budget of the running batch", registry=r
        )
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Requests per new prefill", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "Requested max_new_tokens", buckets=_TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.skipped_tokens = Histogram(
            "tgi_request_skipped_tokens", "Tokens past the first per step (speculation)",
            buckets=(0, 1, 2, 4, 8), registry=r,
        )  # fmt: skip
        self.validation_duration = Histogram(
            "tgi_request_validation_duration", "Validation and tokenization seconds",
            buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip

    def _add_cache_gauges(self, r: CollectorRegistry) -> None:
        """pytgi's own: KV blocks, prefix cache, device memory (Info fields 100+)."""
        self.kv_blocks_free = Gauge("pytgi_kv_blocks_free", "KV blocks free", registry=r)
        self.kv_blocks_used = Gauge(
            "pytgi_kv_blocks_used", "KV blocks held by requests", registry=r
        )
        self.prefix_hits = Gauge(
            "pytgi_prefix_cache_hits", "Requests that reused cached prefix blocks", registry=r
        )
        self.prefix_evictions = Gauge(
            "pytgi_prefix_cache_evictions", "Cached blocks reclaimed for new requests", registry=r
        )
        self.prefix_tokens = Gauge(
            "pytgi_prefix_cache_tokens_reused", "Prompt tokens not recomputed", registry=r
        )
        self.device_memory_used = Gauge(
            "pytgi_device_memory_used_bytes",
            "GPU memory the shards hold after Warmup (0 on CPU)",
            registry=r,
        )
        self.device_memory_total = Gauge(
            "pytgi_device_memory_total_bytes", "GPU memory of the shards' devices", registry=r
        )
        self.kv_cache_bytes = Gauge(
            "pytgi_kv_cache_bytes", "Bytes of the KV pools of every shard", registry=r
        )
        self.kv_capacity_tokens = Gauge(
            "pytgi_kv_cache_capacity_tokens", "Tokens the KV cache holds", registry=r
        )

    def _counter(self, name: str, documentation: str, labels: tuple[str, ...] | list[str] = ()):
        """A TGI counter: monotonic, exposed with type counter under its plain name."""
        gauge = Gauge(name, documentation, labels, registry=None)
        self._counters.append(gauge)
        return gauge

    def render(self) -> bytes:
        return generate_latest(self.registry) + _counter_text(self._counters)

    # ---- scheduler hooks ----
    def on_step(self, method: str, step: StepOut, seconds: float) -> None:
        self.forward_duration.labels(method).observe(step.forward_ns / 1e9)
        self.decode_duration.labels(method).observe(step.decode_ns / 1e9)
        self.batch_inference_duration.labels(method).observe(seconds)
        self.batch_inference_count.labels(method).inc()
        self.batch_success.labels(method).inc()
        if step.concat_ns is not None:
            self.concat_duration.labels(method).observe(step.concat_ns / 1e9)

    def on_step_failure(self, method: str) -> None:
        self.batch_inference_count.labels(method).inc()
        self.batch_failure.labels(method).inc()

    def on_new_batch(self, size: int, joins_running: bool, chunked: bool) -> None:
        """A prefill of `size` new requests; joined to the running batch, it is a concat
        (TGI's reasons: chunking, or backpressure when requests waited for room)."""
        self.batch_next_size.observe(size)
        if joins_running:
            self.batch_concat.labels("chunking" if chunked else "backpressure").inc()

    def on_filter(self, method: str, seconds: float) -> None:
        self.filter_duration.labels(method).observe(seconds)

    def on_validated(self, seconds: float, max_new_tokens: int) -> None:
        self.validation_duration.observe(seconds)
        self.max_new_tokens.observe(max_new_tokens)

    def on_batch(self, batch: CachedBatch | None, queue_size: int) -> None:
        self.batch_size.set(batch.size if batch else 0)
        self.batch_max_tokens.set(batch.max_tokens if batch else 0)
        self.queue_size.set(queue_size)

    def on_evictions(self, total: int) -> None:
        self.prefix_evictions.set(total)

    def on_prefix(self, reused_tokens: int) -> None:
        if reused_tokens:
            self.prefix_hits.inc()
            self.prefix_tokens.inc(reused_tokens)

    def on_shard_info(self, info: ShardInfo) -> None:
        self.device_memory_used.set(info.device_memory_used)
        self.device_memory_total.set(info.device_memory_total)
        self.kv_cache_bytes.set(info.kv_cache_bytes)
        self.kv_capacity_tokens.set(max(0, info.kv_cache_blocks - 1) * info.block_size)

    def on_blocks(self, free: int, used: int) -> None:
        self.kv_blocks_free.set(free)
        self.kv_blocks_used.set(used)

    # ---- request outcomes ----
    def on_success(self, entry: Entry) -> None:
        self.request_success.inc()
        if entry.finished_at is None or entry.started_at is None:
            return
        self.request_duration.observe(entry.finished_at - entry.queued_at)
        self.queue_duration.observe(entry.started_at - entry.queued_at)
        inference = entry.finished_at - entry.started_at
        self.inference_duration.observe(inference)
        if entry.num_generated:
            self.time_per_token.observe(inference / entry.num_generated)
        self.input_length.observe(entry.input_length)
        self.generated_tokens.observe(entry.num_generated)
        self.skipped_tokens.observe(0)  # one token per request per step: nothing speculated
        if entry.first_token_at is not None:
            self.ttft.observe(entry.first_token_at - entry.queued_at)

    def on_failure(self, error_type: str) -> None:
        self.request_failure.labels(error_type).inc()
