"""Telephony edge: Twilio webhooks, signatures, TwiML, Media Streams, REST control."""
