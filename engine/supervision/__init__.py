"""Supervision: the supervisor API (snapshot, live events, commands) and its tokens."""
