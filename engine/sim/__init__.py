"""Simulated caller that speaks Twilio's protocol with real audio, and a Twilio REST stand-in."""
