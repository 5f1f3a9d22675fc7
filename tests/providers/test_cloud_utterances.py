"""The assembler that turns a cloud provider's pieces into our per-utterance events."""

from __future__ import annotations

from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType
from transcribe_gateway.providers.cloud import Utterances

S, P, F, E = (
    SpeechEventType.SPEECH_STARTED,
    SpeechEventType.PARTIAL,
    SpeechEventType.FINAL,
    SpeechEventType.SPEECH_STOPPED,
)


def recorder() -> tuple[Utterances, list[SpeechEvent]]:
    events: list[SpeechEvent] = []

    async def emit(event: SpeechEvent) -> None:
        events.append(event)

    return Utterances(emit), events


def shape(events: list[SpeechEvent]) -> list[tuple[SpeechEventType, int, str]]:
    return [(e.type, e.utterance, e.text) for e in events]


async def test_partials_accumulate_committed_pieces_and_the_interim() -> None:
    u, events = recorder()
    await u.interim("go", start_ms=100)
    await u.commit("go forward", 100, 900)
    await u.interim("ten")
    await u.commit("ten meters", 900, 1800)
    await u.complete()
    await u.speech_stopped(2000)
    assert shape(events) == [
        (S, 0, ""),
        (P, 0, "go"),
        (P, 0, "go forward"),
        (P, 0, "go forward ten"),
        (P, 0, "go forward ten meters"),
        (F, 0, "go forward ten meters"),
        (E, 0, ""),
    ]
    final = events[5]
    assert (final.start_ms, final.end_ms) == (100, 1800)


async def test_final_after_speech_stopped_keeps_its_utterance() -> None:
    u, events = recorder()
    await u.speech_started(0)
    await u.interim("hello there")
    await u.speech_stopped(1200)
    await u.commit("hello there", 0, 1100)
    await u.complete()
    await u.speech_started(2000)
    await u.commit("again", 2000, 2500)
    await u.complete()
    kinds = [(e.type, e.utterance) for e in events]
    # Its stop waits for its final (docs/protocol.md: started, partials,
    # completed, stopped); it came before the final.
    assert kinds == [(S, 0), (P, 0), (P, 0), (F, 0), (E, 0), (S, 1), (P, 1), (F, 1)]
    assert events[4].end_ms == 1200  # the provider's end of speech, kept


async def test_a_stop_held_for_a_final_that_says_nothing_is_sent() -> None:
    # An interim, then speech stopped, then the provider finalizes nothing: the
    # stop is not held for ever, and the next utterance starts.
    u, events = recorder()
    await u.speech_started(0)
    await u.interim("um")
    await u.speech_stopped(800)
    await u.commit("", 0, 800)
    await u.complete()
    await u.speech_started(1500)
    kinds = [(e.type, e.utterance) for e in events]
    assert kinds == [(S, 0), (P, 0), (E, 0), (S, 1)]


async def test_unconfirmed_interim_is_not_lost_at_the_end() -> None:
    u, events = recorder()
    await u.commit("ask not", 0, 800)
    await u.interim("what your country")
    await u.flush(end_ms=2000)
    assert shape(events)[-2:] == [(F, 0, "ask not what your country"), (E, 0, "")]


async def test_a_new_utterance_after_a_final_without_vad_events() -> None:
    u, events = recorder()
    await u.commit("one", 0, 500)
    await u.complete()
    await u.commit("two", 1000, 1500)
    await u.complete()
    await u.flush()
    assert [(e.type, e.utterance, e.text) for e in events if e.type is not P] == [
        (S, 0, ""),
        (F, 0, "one"),
        (E, 0, ""),
        (S, 1, ""),
        (F, 1, "two"),
        (E, 1, ""),
    ]


async def test_silence_only_utterance_gets_no_final() -> None:
    u, events = recorder()
    await u.speech_started(0)
    await u.complete()
    await u.speech_stopped(400)
    await u.speech_started(1000)
    assert [(e.type, e.utterance) for e in events] == [(S, 0), (E, 0), (S, 1)]
