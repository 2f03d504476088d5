"""The `switchboard` command: the only place that knows both the engine and the console."""
