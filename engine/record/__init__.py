"""The record: call history (SQLite schema, writer, facade), latency metrics, the report."""
