"""Local stand-ins for Twilio's REST API, OpenAI and ElevenLabs (their real wire formats)."""
