"""The launcher: starts N shards and one router, supervises them, stops them cleanly."""
