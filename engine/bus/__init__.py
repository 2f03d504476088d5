"""The event bus and its schema: typed events, in-process and Redis Streams backends."""
