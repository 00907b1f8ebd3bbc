"""What every route shares: admission (concurrency limit), submission and the event stream."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from common.config import RouterConfig, defaults
from common.tracing import epoch_ns
from router.chat import ChatTemplate
from router.entry import Entry, Failure
from router.metrics import Metrics
from router.scheduler import Scheduler
from router.types import GenerationOut, ShardInfo, WarmupOut
from router.validation import Validator, ValidRequest

_ROUTER = defaults(RouterConfig)


def state_of(request) -> RouterState:
    """The router state of the application serving `request`."""
    return request.app.state.router


class HTTPError(Exception):
    """Answered as `{"error": message, "error_type": error_type}` with `status`."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message

    @classmethod
    def from_failure(cls, failure: Failure) -> HTTPError:
        return cls(failure.status, failure.error_type, failure.message)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The HTTP layer's settings, taken from RouterConfig (whose defaults these are)."""

    model_id: str
    max_concurrent_requests: int = _ROUTER["max_concurrent_requests"]
    max_client_batch_size: int = _ROUTER["max_client_batch_size"]
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = _ROUTER["payload_limit"]
    allowed_hosts: tuple[str, ...] = ()  # Host names answered; empty: any (see startup)
    client_timeout: float = _ROUTER["client_timeout"]  # body arrival, unread reply: bound


@dataclass(eq=False)
class RouterState:
    settings: ServerSettings
    validator: Validator
    scheduler: Scheduler
    metrics: Metrics
    shard_info: ShardInfo
    warmup: WarmupOut
    chat_template: ChatTemplate | None
    num_shards: int = 1
    in_flight: int = 0
    is_draining: bool = False
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def acquire(self) -> None:
        """Takes one of --max-concurrent-requests: 429 at once when none is free, 503 while
        draining. Pair with release()."""
        if self.is_draining:
            raise HTTPError(503, "unhealthy", "the server is shutting down")
        if self.in_flight >= self.settings.max_concurrent_requests:
            self.metrics.on_failure("overloaded")
            raise HTTPError(429, "overloaded", "Model is overloaded")
        self.in_flight += 1
        self.metrics.request_count.inc()

    def release(self) -> None:
        self.in_flight -= 1

    @asynccontextmanager
    async def slot(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def submit(self, valid: ValidRequest, params=None) -> Entry:
        """Queues one run of `valid` (`params`: best_of's further runs, with their seeds)."""
        if params is None:
            self.metrics.on_validated(valid.validation_seconds, valid.params.max_new_tokens)
        entry = Entry(
            span_context=trace.get_current_span().get_span_context(),
            id=next(self._ids),
            inputs=valid.inputs,
            input_length=valid.input_length,
            params=params or valid.params,
            input_ids=list(valid.input_ids),
        )
        self.scheduler.submit(entry)
        return entry

    async def submit_n(self, valid: ValidRequest, n: int) -> list[Entry]:
        """`n` runs of `valid` (seeds seed, seed + 1, ...). With prefix caching the others
        wait for the first one's prompt, then read its cached blocks instead of computing
        the prompt again."""
        first = self.submit(valid)
        if n == 1:
            return [first]
        if self.scheduler.allocator.prefix_caching:
            await first.prompt_done.wait()
        seed = valid.params.seed
        more = [replace(valid.params, seed=(seed + i) % 2**64) for i in range(1, n)]
        return [first] + [self.submit(valid, params) for params in more]

    async def stream(self, entry: Entry) -> AsyncIterator[GenerationOut]:
        """Yields the entry's generations; raises HTTPError on failure. If the consumer goes
        away (cancellation, closed generator), the request is cancelled and its blocks freed."""
        finished = False
        try:
            while True:
                event = await entry.events.get()
                if isinstance(event, Failure):
                    self.metrics.on_failure(event.error_type)
                    finished = True
                    record_request_spans(entry, event.error_type)
                    raise HTTPError.from_failure(event)
                yield event
                if event.finished is not None:
                    finished = True
                    self.metrics.on_success(entry)
                    record_request_spans(entry, None)
                    return
        finally:
            if not finished:
                entry.cancel()
                self.scheduler.wake()

    async def collect(self, entry: Entry) -> list[GenerationOut]:
        return [g async for g in self.stream(entry)]


_tracer = trace.get_tracer("pytgi.router")


def record_request_spans(entry: Entry, error_type: str | None) -> None:
    """The request's time in the queue and in batches, as child spans of its HTTP span
    (stamped afterwards from the entry's timings)."""
    if not entry.span_context or not entry.span_context.is_valid:
        return
    parent = trace.set_span_in_context(trace.NonRecordingSpan(entry.span_context))
    end = entry.finished_at or time.monotonic()
    started = entry.started_at or end
    for name, start, stop in (("queue", entry.queued_at, started), ("infer", started, end)):
        span = _tracer.start_span(name, context=parent, start_time=epoch_ns(start))
        span.set_attribute("request_id", entry.id)
        if name == "infer":
            span.set_attribute("generated_tokens", entry.num_generated)
            if error_type is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error_type))
        span.end(end_time=epoch_ns(stop))


async def until_disconnected(request, poll_seconds: float = 0.1) -> None:
    """Returns once the HTTP client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(poll_seconds)


async def collect_or_cancel(
    state: RouterState, request, entries: list[Entry]
) -> list[list[GenerationOut]]:
    """Collects every entry's generations; a client that disconnects cancels them all."""
    work = asyncio.ensure_future(asyncio.gather(*(state.collect(e) for e in entries)))
    watcher = asyncio.ensure_future(until_disconnected(request))
    pending: set[asyncio.Future] = {work, watcher}
    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watcher.cancel()
        return work.result()
    work.cancel()
    for entry in entries:
        entry.cancel()
    state.scheduler.wake()
    raise HTTPError(499, "cancelled", "the client disconnected")
