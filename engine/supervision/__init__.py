"""Supervision: the supervisor API and its tokens, the call views it shows, the commands it runs."""
