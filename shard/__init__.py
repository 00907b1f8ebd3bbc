"""The shard: loads a model, owns the paged KV cache, runs Prefill and Decode over gRPC."""
