"""The record: call history (schema, writer, facade), the itemised bill, metrics, the report."""
