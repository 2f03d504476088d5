"""Switchboard engine: answers Twilio calls over bidirectional Media Streams."""

__version__ = "0.1.0"
