"""One object per request: its parameters, its blocks, its timings and its event stream."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from router.types import GenerationOut, Params


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Failure:
    """A terminal error for one request: HTTP status, TGI error_type and message."""

    status: int
    error_type: str
    message: str


@dataclass(eq=False, slots=True)
class Entry:
    id: int
    inputs: str
    input_length: int
    params: Params
    input_ids: list[int] = field(default_factory=list)  # the prompt as the shard will see it
    blocks: list[int] = field(default_factory=list)
    cache_len: int = 0  # prompt tokens whose K/V come from the prefix cache
    is_prompt_cached: bool = False  # its prompt blocks are registered in the prefix cache
    state: State = State.WAITING
    is_cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    num_generated: int = 0
    # the HTTP request's span (tracing): parent of its queue/infer spans, linked from batches
    span_context: Any = None
    # Stream of GenerationOut, ended by one whose `finished` is set or by a Failure.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    # set at its first token (its prompt's K/V are then in the prefix cache) or its failure
    prompt_done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def max_total_tokens(self) -> int:
        """KV tokens reserved on admission: prompt + max_new_tokens."""
        return self.input_length + self.params.max_new_tokens

    @property
    def is_done(self) -> bool:
        return self.state is State.DONE

    def push(self, generation: GenerationOut) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self.prompt_done.set()
        self.num_generated += len(generation.tokens)
        if generation.finished is not None:
            self.state, self.finished_at = State.DONE, now
        self.events.put_nowait(generation)

    def fail(self, failure: Failure) -> None:
        if self.state is State.DONE:
            return
        self.state, self.finished_at = State.DONE, time.monotonic()
        self.prompt_done.set()
        self.events.put_nowait(failure)

    def cancel(self) -> None:
        """The client went away: the scheduler drops the request within one step."""
        self.is_cancelled = True
