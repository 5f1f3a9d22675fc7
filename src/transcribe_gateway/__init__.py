"""transcribe-gateway: a self-hostable real-time speech-to-text WebSocket gateway."""

__version__ = "0.1.0"
