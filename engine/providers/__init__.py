"""Providers: speech-to-text, agent (LLM or FAQ), text-to-speech; one module each."""
