"""Audio: G.711 mu-law codec, resampling, 20 ms framing, voice activity detection."""
