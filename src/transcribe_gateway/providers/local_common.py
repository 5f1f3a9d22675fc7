"""What the embedded engines' streams share: voice activity from the stream options,
and stream time in milliseconds."""

from __future__ import annotations

from transcribe_gateway.audio.vad import NARROWBAND_RATE, SAMPLE_RATE, Endpointer, VoiceActivity
from transcribe_gateway.providers.base import StreamOptions


def voice_activity(
    options: StreamOptions, max_utterance_ms: int, *, endpointing_ms: int | None = None
) -> VoiceActivity:
    """Silero VAD with the session's endpointing and VAD settings; ``endpointing_ms``
    overrides the session's (a stream that ends some utterances sooner itself)."""
    return VoiceActivity(
        Endpointer(
            threshold=options.vad_threshold,
            min_speech_ms=options.vad_min_speech_ms,
            endpointing_ms=endpointing_ms or options.endpointing_ms,
            prefix_padding_ms=options.vad_prefix_padding_ms,
            max_utterance_ms=max_utterance_ms,
        ),
        narrowband=options.source_rate <= NARROWBAND_RATE,
    )


def to_ms(sample: int) -> int:
    """A position in the stream, in samples at ``SAMPLE_RATE``, as milliseconds."""
    return sample * 1000 // SAMPLE_RATE
