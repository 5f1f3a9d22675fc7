"""Audio helpers: G.711 and PCM decoding, resampling, voice activity. Pure and synchronous."""
