"""Code shared by router, shard and launcher: config records and the generated protocol."""
