"""The reply's client timeout (router/app.py `_bounded`): a send the client does not take
for `timeout` seconds fails with ClientTooSlow; a stream whose sends each complete is never
cut however long it runs; the caller's own cancellation stays a cancellation; the timer
ends with the response."""

from __future__ import annotations

import asyncio

import pytest

from router.app import ClientTooSlow, _bounded

BODY = {"type": "http.response.body", "body": b"x", "more_body": True}
LAST = {"type": "http.response.body", "body": b"", "more_body": False}
START = {"type": "http.response.start", "status": 200, "headers": []}


def _timers(loop) -> int:
    return sum(not h.cancelled() for h in loop._scheduled)  # asyncio's pending timers


async def test_a_send_the_client_does_not_take_fails_after_the_timeout():
    blocked = asyncio.Event()

    async def send(message):
        if message is BODY:
            await blocked.wait()  # the socket buffers are full: never drained

    bounded = _bounded(send, 0.2)
    await bounded(START)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ClientTooSlow):
        await bounded(BODY)
    assert 0.19 <= loop.time() - start < 1.0
    assert asyncio.current_task().cancelling() == 0  # our cancellation, taken back


async def test_a_stream_longer_than_the_timeout_whose_sends_complete_is_not_cut():
    sent = []

    async def send(message):
        await asyncio.sleep(0.03)  # each send takes a while, none takes the timeout
        sent.append(message)

    bounded = _bounded(send, 0.1)
    await bounded(START)
    for _ in range(12):  # ~0.36 s in all, several timeouts' worth
        await bounded(BODY)
    await bounded(LAST)
    assert len(sent) == 14


async def test_a_late_send_after_an_idle_gap_gets_its_own_full_timeout():
    """The timer armed by an early send fires while nothing is pending; a send started later
    is judged from its own start (it would be cut early if the first arming counted)."""

    async def send(message):
        await asyncio.sleep(0.15 if message is LAST else 0)

    bounded = _bounded(send, 0.2)
    await bounded(START)
    await asyncio.sleep(0.1)  # no send pending when the first timer fires at 0.2 s
    await bounded(BODY)
    await bounded(LAST)  # 0.15 s from its own start: under the timeout


async def test_the_caller_s_cancellation_is_not_a_slow_client():
    async def send(message):
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(_bounded(send, 10.0)(BODY))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_timer_ends_with_the_response():
    async def send(message):
        pass

    loop = asyncio.get_running_loop()
    before = _timers(loop)
    bounded = _bounded(send, 30.0)
    await bounded(START)
    await bounded(BODY)
    assert _timers(loop) == before + 1  # one timer for the whole response
    await bounded(LAST)
    assert _timers(loop) == before
