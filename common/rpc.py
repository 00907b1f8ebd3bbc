"""What both ends of the shard protocol agree on besides the messages: message size limits
and the shared secret that authenticates every call (no grpc import here)."""

from __future__ import annotations

# A Prefill carries each request's text once; a batch of payload-limit prompts is far over
# gRPC's 4 MiB default, so both ends lift the limits, as TGI does.
MESSAGE_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)
SECRET_ENV = "PYTGI_SHARD_SECRET"  # how the launcher hands the secret to its children
SECRET_HEADER = "x-pytgi-shard-secret"  # gRPC metadata key carrying it on every call


def secret_metadata(secret: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata proving the caller knows the shards' secret (None when there is none)."""
    return ((SECRET_HEADER, secret),) if secret else None
