"""From a session's config to an engine: the stream options to open it with, and
the effective config announced back (``session.created`` / ``session.updated``).

Pure functions, kept out of the connection so what a client is told about its
session (a language the model cannot do, features it ignores, the defaults it
got) is read and tested in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.protocol import messages as m
from transcribe_gateway.providers.base import StreamOptions
from transcribe_gateway.providers.registry import Resolution

# StreamOptions holds the defaults (docs/protocol.md) for the session.vad
# fields a client leaves out.
_DEFAULTS: Final = StreamOptions(model="")


@dataclass(frozen=True, slots=True)
class Plan:
    """An engine chosen for the session: how to open it and what to announce."""

    resolution: Resolution
    options: StreamOptions
    effective: m.EffectiveConfig


def plan_for(
    config: m.SessionConfig, resolution: Resolution, *, endpointing_ms: int, session_id: str = ""
) -> Plan:
    """How ``resolution`` serves ``config`` for session ``session_id``;
    ``endpointing_ms`` is the server's default.

    What the model cannot do is not an error: the session goes on without it
    and ``effective.unsupported`` says what was dropped (a language the model
    does not transcribe becomes the one it does).
    """
    model = resolution.model
    unsupported: list[str] = []
    language = config.language
    if model.languages is not None and not model.has_language(language):
        unsupported.append(f"language={language} ({model.name} transcribes {model.languages[0]})")
        language = model.languages[0]
    if config.prompt and not model.supports_prompt:
        unsupported.append("prompt")
    if config.vad and not model.supports_vad:
        unsupported.append("vad")
    if config.endpointing is not None and not model.supports_endpointing:
        unsupported.append("endpointing")
    vad = config.vad or m.VadConfig()
    endpointing = config.endpointing or endpointing_ms
    unfinished = config.endpointing_unfinished
    if unfinished is not None and not model.supports_endpointing_unfinished:
        unsupported.append("endpointing_unfinished")
        unfinished = None
    elif unfinished is not None:
        unfinished = max(unfinished, endpointing)  # never sooner than a finished sentence
    options = StreamOptions(
        model=model.name,
        language=language,
        prompt=config.prompt,
        sample_rate=model.input_rate,
        source_rate=config.sample_rate,
        endpointing_ms=endpointing,
        endpointing_unfinished_ms=unfinished,
        vad_threshold=_DEFAULTS.vad_threshold if vad.threshold is None else vad.threshold,
        vad_prefix_padding_ms=(
            _DEFAULTS.vad_prefix_padding_ms
            if vad.prefix_padding_ms is None
            else vad.prefix_padding_ms
        ),
        vad_min_speech_ms=(
            _DEFAULTS.vad_min_speech_ms if vad.min_speech_ms is None else vad.min_speech_ms
        ),
        session_id=session_id,
    )
    # What is really used, defaults filled in (none where the engine has its own VAD).
    effective_vad = (
        m.VadConfig(options.vad_threshold, options.vad_prefix_padding_ms, options.vad_min_speech_ms)
        if model.supports_vad
        else None
    )
    effective = m.EffectiveConfig(
        provider=resolution.stt.provider,
        model=model.name,
        language=language,
        input_audio_format=config.input_audio_format,
        sample_rate=config.sample_rate,
        endpointing=endpointing if model.supports_endpointing else None,
        endpointing_unfinished=unfinished,
        # Only what the engine honours is announced: an ignored prompt or
        # endpointing is in `unsupported`, not echoed back as if in use.
        prompt=config.prompt if model.supports_prompt else None,
        vad=effective_vad,
        fallback=config.fallback,
        requested_provider=resolution.requested_provider,
        requested_model=resolution.requested_model,
        notice=resolution.notice,
        unsupported=unsupported,
    )
    return Plan(resolution, options, effective)


def serving_instead(fallback: Plan, exc: ProviderError, config: m.SessionConfig) -> Plan:
    """``fallback`` announced as serving ``config`` in place of the engine that failed
    with ``exc``: the ``requested_*`` fields are what the client asked for, and the
    notice says what failed (a substitute, if one served) and what serves now (a
    substitute for the fallback, if it is one)."""
    failed = exc.provider
    if failed != config.provider:  # a substitute served the client's provider
        failed = f"{failed} (serving {config.provider}/{config.model})"
    serving = f"{fallback.effective.provider}/{fallback.effective.model}"
    notice = f"{failed} failed ({exc.reason}); this session is served by its fallback {serving}"
    if fallback.effective.notice:  # the fallback was itself substituted
        notice += f" ({fallback.effective.notice})"
    effective = msgspec.structs.replace(
        fallback.effective,
        requested_provider=config.provider,
        requested_model=config.model,
        notice=notice,
    )
    return Plan(fallback.resolution, fallback.options, effective)
