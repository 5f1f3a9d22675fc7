"""What a stream collected: its events, outcome and client-side latency figures."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from transcribe_gateway.client.events import Event
from transcribe_gateway.protocol.messages import (
    Error,
    ErrorInfo,
    SessionClosed,
    TranscriptionCompleted,
)

__all__ = ["StreamResult", "Timings"]


@dataclass(slots=True)
class Timings:
    """Latency figures measured on the client's monotonic clock.

    Attributes:
        first_partial_s: seconds from the first audio chunk sent to the first
            ``transcription.partial`` received; None if none came.
        first_final_s: same for the first ``transcription.completed``.
        final_latencies_s: for each ``transcription.completed``, seconds from
            the moment the chunk holding its ``end_ms`` was sent to its arrival.
    """

    first_partial_s: float | None = None
    first_final_s: float | None = None
    final_latencies_s: list[float] = field(default_factory=list)

    @property
    def median_final_latency_s(self) -> float | None:
        """Median of :attr:`final_latencies_s`, None when there is no final."""
        return statistics.median(self.final_latencies_s) if self.final_latencies_s else None

    @property
    def max_final_latency_s(self) -> float | None:
        """Largest of :attr:`final_latencies_s`, None when there is no final."""
        return max(self.final_latencies_s) if self.final_latencies_s else None


@dataclass(slots=True)
class StreamResult:
    """What :meth:`TranscribeClient.stream_samples` collected.

    Attributes:
        session_id: the server's session id.
        events: every server message received during the stream, in order.
        closed: the ``session.closed`` message.  Never None from
            :meth:`TranscribeClient.stream_samples`: without one the session
            did not end cleanly, and it raises :class:`TranscribeConnectionClosed`.
        close_code: the WebSocket close code, None if the server had not
            closed the socket shortly after ``session.closed``.
        audio_seconds: seconds of audio this stream sent: all of the samples,
            or less when the session ended first (e.g. a server shutdown).
        wall_seconds: seconds from the start of sending to the end of the stream.
        timings: first-partial and per-final latencies.
    """

    session_id: str
    events: list[Event]
    closed: SessionClosed | None
    close_code: int | None
    audio_seconds: float
    wall_seconds: float
    timings: Timings

    @property
    def finals(self) -> list[TranscriptionCompleted]:
        """The ``transcription.completed`` messages, in order."""
        return [e for e in self.events if isinstance(e, TranscriptionCompleted)]

    @property
    def errors(self) -> list[ErrorInfo]:
        """The ``error`` payloads received during the stream."""
        return [e.error for e in self.events if isinstance(e, Error)]

    @property
    def transcript(self) -> str:
        """The final texts joined by spaces."""
        return " ".join(f.text.strip() for f in self.finals if f.text.strip())
