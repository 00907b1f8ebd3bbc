"""Errors the shard reports to its caller; the gRPC interceptor maps `status` to a code."""

from __future__ import annotations


class ShardError(Exception):
    """Base class: `status` names the gRPC status code the caller receives."""

    status = "INTERNAL"


class InvalidRequest(ShardError):
    """The request is malformed or asks for something unsupported."""

    status = "INVALID_ARGUMENT"


class BatchNotFound(ShardError):
    """A batch id that the shard does not hold."""

    status = "NOT_FOUND"


class NotReady(ShardError):
    """The call needs a step that has not happened yet (e.g. Warmup)."""

    status = "FAILED_PRECONDITION"


class OutOfBlocks(ShardError):
    """Not enough KV blocks or memory for what was asked."""

    status = "RESOURCE_EXHAUSTED"


class ModelLoadError(ShardError):
    """The model directory cannot be served; the message is one line naming the fix."""

    status = "FAILED_PRECONDITION"
