"""Prometheus metrics (``GET /metrics``) and the per-session latency tracker.

One registry per process.  Other modules count through the objects here, e.g.
``metrics.provider_errors.labels(provider="DEEPGRAM").inc()`` or
``metrics.fallbacks.labels(from_provider="DEEPGRAM", to_provider="LOCAL").inc()``.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType

REGISTRY: Final = CollectorRegistry(auto_describe=True)
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS: Final = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

active_sessions: Final = Gauge(
    "transcribe_active_sessions", "Authenticated sessions now open", registry=REGISTRY
)
sessions: Final = Counter(
    "transcribe_sessions",
    "Sessions ended, by close reason",
    ["reason"],
    registry=REGISTRY,
)
audio_seconds: Final = Counter(
    "transcribe_audio_seconds",
    "Seconds of audio received, by the provider serving it",
    ["provider"],
    registry=REGISTRY,
)
provider_errors: Final = Counter(
    "transcribe_provider_errors",
    "Provider failures seen by sessions",
    ["provider"],
    registry=REGISTRY,
)
fallbacks: Final = Counter(
    "transcribe_fallbacks",
    "Sessions switched to their fallback provider",
    ["from_provider", "to_provider"],
    registry=REGISTRY,
)
refusals: Final = Counter(
    "transcribe_refusals",
    "Sessions refused or ended by a limit",
    ["code"],
    registry=REGISTRY,
)
rate_waits: Final = Counter(
    "transcribe_rate_limit_waits",
    "Times a session held a client's messages a second for its key's message rate",
    registry=REGISTRY,
)
first_partial_seconds: Final = Histogram(
    "transcribe_time_to_first_partial_seconds",
    "From the arrival of an utterance's first audio to its first partial",
    registry=REGISTRY,
    buckets=_LATENCY_BUCKETS,
)
final_latency_seconds: Final = Histogram(
    "transcribe_final_latency_seconds",
    "From the arrival of the audio at an utterance's end to its final",
    registry=REGISTRY,
    buckets=_LATENCY_BUCKETS,
)
loop_lag_seconds: Final = Gauge(
    "transcribe_event_loop_lag_seconds",
    "How late the last event-loop probe woke up",
    registry=REGISTRY,
)
loop_lag: Final = Histogram(
    "transcribe_event_loop_lag_probe_seconds",
    "Event-loop probe lateness",
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


def render() -> bytes:
    """The text exposition format."""
    return generate_latest(REGISTRY)


async def watch_loop_lag(interval_s: float = 0.5) -> None:
    """Probe the event loop forever: a sleep that wakes up late means a blocked loop."""
    while True:
        start = time.monotonic()
        await asyncio.sleep(interval_s)
        lag = max(0.0, time.monotonic() - start - interval_s)
        loop_lag_seconds.set(lag)
        loop_lag.observe(lag)


class LatencyTracker:
    """When each stretch of a session's audio arrived, to time engine events.

    Engines report times on the audio timeline; the tracker maps them back to
    the wall clock at which that audio reached the gateway.
    """

    def __init__(self, horizon: int = 4096) -> None:
        self._ends_ms: deque[int] = deque(maxlen=horizon)
        self._arrived: deque[float] = deque(maxlen=horizon)
        self._starts: dict[tuple[int, int], int] = {}
        self._partial_seen: set[tuple[int, int]] = set()

    def on_audio(self, total_seconds: float, now: float) -> None:
        """Audio up to ``total_seconds`` of the session arrived at ``now`` (monotonic)."""
        self._ends_ms.append(int(total_seconds * 1000 + 0.5))
        self._arrived.append(now)

    def _arrival(self, audio_ms: int) -> float | None:
        i = bisect.bisect_left(self._ends_ms, audio_ms)
        if i >= len(self._ends_ms):
            return None
        return self._arrived[i]

    def observe(self, generation: int, event: SpeechEvent, offset_ms: int) -> None:
        """Time an engine event (called as it is forwarded to the client)."""
        key = (generation, event.utterance)
        now = time.monotonic()
        if event.type is SpeechEventType.SPEECH_STARTED:
            if len(self._starts) > 64:  # utterances that never got a final: forget them
                self._starts.clear()
                self._partial_seen.clear()
            self._starts[key] = event.start_ms + offset_ms
        elif event.type is SpeechEventType.PARTIAL:
            if key in self._partial_seen:
                return
            if len(self._partial_seen) > 64:
                self._partial_seen.clear()
            self._partial_seen.add(key)
            start = self._starts.get(key, event.start_ms + offset_ms)
            arrived = self._arrival(start)
            if arrived is not None:
                first_partial_seconds.observe(max(0.0, now - arrived))
        elif event.type is SpeechEventType.FINAL:
            arrived = self._arrival(event.end_ms + offset_ms)
            if arrived is not None:
                final_latency_seconds.observe(max(0.0, now - arrived))
            self._partial_seen.discard(key)
            self._starts.pop(key, None)
