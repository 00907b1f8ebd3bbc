"""A stream's slot and request outlive no failed send, whatever the ASGI server's version."""

import asyncio

import pytest

from router.streaming import start_stream


class Slots:
    def __init__(self) -> None:
        self.in_flight = 0

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_a_send_that_fails_releases_the_slot_and_closes_the_events_at_once(spec_version):
    """The client stops reading: the second body send fails (ClientTooSlow is an OSError).
    The slot is free and the events' `finally` (which cancels the request) has run when the
    response returns, not when the garbage collector finds the generators."""
    state, closed = Slots(), []

    async def events():
        try:
            for i in range(100):
                yield f"data: {i}\n\n".encode()
        finally:
            closed.append(True)

    async def make():
        return events()

    sent = []

    async def send(message):
        if message["type"] == "http.response.body" and len(sent) == 2:
            raise OSError("the client read nothing")
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)  # the client never disconnects, it only stops reading

    async def go():
        response = await start_stream(state, make)
        assert state.in_flight == 1
        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        with pytest.raises(Exception):  # noqa: B017  (Starlette's ClientDisconnect or OSError)
            await response(scope, receive, send)
        await asyncio.sleep(0)  # (a finalizer would have been scheduled; none is waited for)
        # before the loop closes (asyncio.run would close leftover generators itself)
        assert state.in_flight == 0
        assert closed == [True]
        assert len(sent) == 2  # the headers and one event

    asyncio.run(go())
