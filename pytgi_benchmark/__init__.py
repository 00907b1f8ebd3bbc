"""`pytgi-benchmark`: shard-level latency and throughput over gRPC, like TGI's
text-generation-benchmark (it bypasses the router)."""
