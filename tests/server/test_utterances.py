"""The relay from engine streams' events to the client's utterances (in process)."""

from __future__ import annotations

import logging

from transcribe_gateway.protocol import messages as m
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType, WordTiming
from transcribe_gateway.server.utterances import SpeechMessage, UtteranceRelay

STARTED, PARTIAL, FINAL, STOPPED = (
    SpeechEventType.SPEECH_STARTED,
    SpeechEventType.PARTIAL,
    SpeechEventType.FINAL,
    SpeechEventType.SPEECH_STOPPED,
)


def relay() -> tuple[UtteranceRelay, list[SpeechMessage]]:
    sent: list[SpeechMessage] = []
    return UtteranceRelay(sent.append, logging.LoggerAdapter(logging.getLogger("t"))), sent


def event(
    kind: SpeechEventType, utterance: int, text: str = "", start: int = 0, end: int = 0
) -> SpeechEvent:
    words = (WordTiming(text, start, end),) if kind is FINAL and text else ()
    return SpeechEvent(
        kind, utterance=utterance, text=text, start_ms=start, end_ms=end, words=words
    )


def test_streams_share_one_numbering_and_the_session_clock() -> None:
    r, sent = relay()
    assert not r.forward(1, 0, event(STARTED, 0, start=100))
    assert r.forward(1, 0, event(FINAL, 0, "one", 100, 900))
    r.forward(1, 0, event(STOPPED, 0, end=1000))
    # A second stream (a fallback) starts at 5 s of the session and counts from 0.
    r.forward(2, 5000, event(STARTED, 0, start=200))
    assert r.forward(2, 5000, event(FINAL, 0, "two", 200, 700))
    assert [(type(s).__name__, s.utterance_id) for s in sent] == [
        ("SpeechStarted", "utt_1"),
        ("TranscriptionCompleted", "utt_1"),
        ("SpeechStopped", "utt_1"),
        ("SpeechStarted", "utt_2"),
        ("TranscriptionCompleted", "utt_2"),
    ]
    final = sent[4]
    assert isinstance(final, m.TranscriptionCompleted)
    assert (final.start_ms, final.end_ms) == (5200, 5700)
    assert [(w.start_ms, w.end_ms) for w in final.words] == [(5200, 5700)]


def test_a_final_after_its_utterance_ended_is_an_utterance_of_its_own() -> None:
    r, sent = relay()
    r.forward(1, 0, event(STARTED, 0))
    r.forward(1, 0, event(STOPPED, 0, end=500))
    assert not r.forward(1, 0, event(PARTIAL, 0, "late"))  # dropped
    assert not r.forward(1, 0, event(FINAL, 0, "late", 0, 400))  # not its utterance's final
    kinds = [(type(s).__name__, s.utterance_id) for s in sent]
    assert kinds == [
        ("SpeechStarted", "utt_1"),
        ("SpeechStopped", "utt_1"),
        ("SpeechStarted", "utt_2"),
        ("TranscriptionCompleted", "utt_2"),
        ("SpeechStopped", "utt_2"),
    ]


def test_closing_a_stream_stops_its_open_utterances_and_keeps_shown_words() -> None:
    r, sent = relay()
    r.forward(1, 0, event(STARTED, 0, start=0))
    r.forward(1, 0, event(PARTIAL, 0, "hello wor", 0))
    r.forward(2, 0, event(STARTED, 0, start=300))  # another stream's: left alone
    r.close(1, 1500, finals=True)
    assert sent[-2:] == [
        m.TranscriptionCompleted("utt_1", "hello wor", 0, 1500, []),
        m.SpeechStopped("utt_1", 1500),
    ]
    sent.clear()
    r.close(2, 2000, finals=False)  # its audio is replayed: no final from it
    assert sent == [m.SpeechStopped("utt_2", 2000)]
    sent.clear()
    r.close(2, 2000, finals=True)
    assert sent == []  # nothing is closed twice
