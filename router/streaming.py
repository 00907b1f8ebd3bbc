"""What the TGI and OpenAI streams share: the slot a stream holds, Server-Sent Events framing,
and JSON-safe numbers."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import TypeVar

from fastapi.responses import StreamingResponse

from router.core import RouterState

T = TypeVar("T")


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators in the order they come. Closing this one (the
    client went away) closes them all, which cancels their requests."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a log-probability without a finite value is null."""
    return value if math.isfinite(value) else None


def sse(data: dict | str) -> bytes:
    """One Server-Sent Event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n".encode()


async def start_stream(state: RouterState, make_events) -> StreamingResponse:
    """Takes a slot and runs `make_events()` (validation) before any byte is sent, so
    429/422 keep their status; the slot is held until the stream ends."""
    state.acquire()
    try:
        events = await make_events()
    except BaseException:
        state.release()
        raise

    async def held():
        try:
            async for chunk in events:
                yield chunk
        finally:
            try:
                await events.aclose()  # its request is cancelled now, not when collected
            finally:
                state.release()

    return ClosingStream(held(), media_type="text/event-stream")


class ClosingStream(StreamingResponse):
    """A stream whose events are closed however the response ends. Starlette (1.x, ASGI
    2.4 servers) turns a failed send into ClientDisconnect without closing the iterator, so
    the stream's `finally` (its slot, its request's cancellation) would wait for the garbage
    collector: a client that stopped reading held its slot indefinitely."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
