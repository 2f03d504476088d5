"""Telephony edge: Twilio webhooks, signatures, TwiML, Media Streams, the session's ports."""
