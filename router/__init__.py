"""The router: HTTP APIs, validation, the KV block allocator and continuous batching.

It never imports torch or the shard: it talks to shards only over gRPC.
"""
