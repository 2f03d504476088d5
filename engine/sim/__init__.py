"""The simulator: a caller speaking Twilio's protocol with real audio, scenarios, API stand-ins."""
