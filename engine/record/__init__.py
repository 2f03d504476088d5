"""The record: call history (SQLite), latency metrics, the business report."""
