"""Async Python client SDK and ``stream`` command for the Transcribe WebSocket protocol."""

from transcribe_gateway.client.sdk import (
    AuthMode,
    Event,
    StreamResult,
    Timings,
    TranscribeClient,
    TranscribeClientError,
    TranscribeConnectionClosed,
    TranscribeError,
    TranscribeQuotaExceeded,
    TranscribeUnauthorized,
    UnknownEvent,
    event_to_dict,
)
from transcribe_gateway.protocol.messages import FallbackConfig, VadConfig

__all__ = [
    "AuthMode",
    "Event",
    "FallbackConfig",
    "StreamResult",
    "Timings",
    "TranscribeClient",
    "TranscribeClientError",
    "TranscribeConnectionClosed",
    "TranscribeError",
    "TranscribeQuotaExceeded",
    "TranscribeUnauthorized",
    "UnknownEvent",
    "VadConfig",
    "event_to_dict",
]
