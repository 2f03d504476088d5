"""Switchboard supervisor console (Textual)."""
