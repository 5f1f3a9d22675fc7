"""Engine events as the client's utterances: one numbering, one timeline, no gaps.

A session may be served by several engine streams over its life (a fallback,
a reconfiguration, a stream replaced and still finishing beside the new one).
Each stream numbers its utterances from 0 and times them from its own start;
:class:`UtteranceRelay` turns their events into the protocol's messages with
session-wide ids (``utt_1``, ``utt_2``...) and times on the session's clock,
keeps each utterance in the protocol's order (started, partials, one final,
stopped), and closes what a stream leaves open when it ends early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from transcribe_gateway.protocol import messages as m
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType

_FINAL_SENT: Final = 1
_STOP_SENT: Final = 2
_REMEMBERED: Final = 16
"""Ended utterances remembered per stream (a stop may follow its final)."""

Key = tuple[int, int]
"""(stream generation, the stream's own utterance number)."""
SpeechMessage = (
    m.SpeechStarted | m.SpeechStopped | m.TranscriptionPartial | m.TranscriptionCompleted
)


class UtteranceRelay:
    """Forward engine streams' events to the client as protocol messages.

    Args:
        send: sends one message to the client.
        log: the session's logger.
    """

    def __init__(
        self, send: Callable[[SpeechMessage], None], log: logging.LoggerAdapter[logging.Logger]
    ) -> None:
        self._send = send
        self._log = log
        self._count = 0
        self._ids: dict[Key, str] = {}
        self._said: dict[Key, int] = {}
        """What was sent of each utterance that ended: ``_FINAL_SENT``, ``_STOP_SENT``."""
        self._open_partials: dict[Key, tuple[str, str, int]] = {}
        """Utterances with a partial but no final yet: (utterance id, text, start ms)."""
        self._unstopped: dict[Key, str] = {}
        """Utterances started and not yet stopped."""

    def forward(self, generation: int, offset_ms: int, event: SpeechEvent) -> bool:
        """Send ``event`` of stream ``generation``, whose clock starts at ``offset_ms``.

        Returns:
            Whether it was sent as its utterance's final (not one out of order,
            sent as an utterance of its own).
        """
        key = (generation, event.utterance)
        utterance_id = self._ids.get(key)
        if utterance_id is None:
            self._count += 1
            utterance_id = self._ids[key] = f"utt_{self._count}"
        kind = event.type
        said = self._said.get(key, 0)
        if said & _STOP_SENT or (said and kind is not SpeechEventType.SPEECH_STOPPED):
            # An engine out of the protocol's order (a plugin's): started,
            # partials, one final, stopped. Nothing after the final or the stop
            # joins the utterance; a final's words are kept as an utterance of
            # their own, a partial is dropped (its final, if any, follows).
            if kind is SpeechEventType.FINAL:
                self._send_apart(offset_ms, event)
            return False
        if kind is SpeechEventType.PARTIAL:
            self._send(m.TranscriptionPartial(utterance_id, event.text))
            opened = self._open_partials.get(key)
            start_ms = opened[2] if opened else event.start_ms + offset_ms
            self._open_partials[key] = (utterance_id, event.text, start_ms)
        elif kind is SpeechEventType.FINAL:
            self._send(completed(utterance_id, event, offset_ms))
            self._open_partials.pop(key, None)
            self._ended(key, _FINAL_SENT)
            return True
        elif kind is SpeechEventType.SPEECH_STARTED:
            self._send(m.SpeechStarted(utterance_id, event.start_ms + offset_ms))
            self._open_partials.pop(key, None)
            self._unstopped[key] = utterance_id
        else:
            self._send(m.SpeechStopped(utterance_id, event.end_ms + offset_ms))
            self._unstopped.pop(key, None)
            self._open_partials.pop(key, None)  # stopped without a final: it said nothing
            self._ended(key, _STOP_SENT)
        return False

    def close(self, generation: int, end_ms: int, *, finals: bool, send: bool = True) -> None:
        """Stream ``generation`` ends without finishing its utterances (it failed,
        or was cut off): each still gets its ``speech.stopped`` at ``end_ms``, so
        none is left open.

        With ``finals`` an utterance's last partial first becomes its final:
        unconfirmed words are better than lost ones, and the client can tell
        them from a provider final by the ``error`` that follows.  Without (a
        fallback replays that audio) the partial is dropped, as the fallback
        transcribes those words again.  Without ``send`` (the session no longer
        streams) nothing is sent, and the stream's utterances are forgotten.
        """
        keys = {**self._unstopped, **self._open_partials}
        for key in sorted(k for k in keys if k[0] == generation):
            partial = self._open_partials.pop(key, None)
            utterance_id = self._unstopped.pop(key, None) or (partial[0] if partial else "")
            if not send:
                continue
            if finals and partial is not None:
                _, text, start_ms = partial
                self._send(m.TranscriptionCompleted(utterance_id, text, start_ms, end_ms, []))
            self._send(m.SpeechStopped(utterance_id, end_ms))
        # Nothing more comes of this stream: forget its utterances.
        for key in [k for k in self._ids if k[0] == generation]:
            del self._ids[key]
        self._said = {k: v for k, v in self._said.items() if k[0] != generation}

    def close_all(self, end_ms: int, *, finals: bool) -> None:
        """Every stream's utterances end at ``end_ms`` (the session is cut off)."""
        for generation in sorted({key[0] for key in (*self._unstopped, *self._open_partials)}):
            self.close(generation, end_ms, finals=finals)

    def _ended(self, key: Key, sent: int) -> None:
        # Remember what was sent of the utterance (its stop may still follow its
        # final), never more than a few utterances back. Another stream's (one
        # retired, still finishing) are forgotten when it is closed.
        self._said[key] = self._said.get(key, 0) | sent
        generation, number = key
        for old in [k for k in self._said if k[0] == generation and k[1] < number - _REMEMBERED]:
            del self._said[old]
            self._ids.pop(old, None)

    def _send_apart(self, offset_ms: int, event: SpeechEvent) -> None:
        """A final for an utterance already finalized or stopped, as an utterance of its own."""
        self._log.warning("engine sent a final out of order; sent as a new utterance")
        self._count += 1
        utterance_id = f"utt_{self._count}"
        final = completed(utterance_id, event, offset_ms)
        self._send(m.SpeechStarted(utterance_id, final.start_ms))
        self._send(final)
        self._send(m.SpeechStopped(utterance_id, final.end_ms))


def completed(utterance_id: str, event: SpeechEvent, offset_ms: int) -> m.TranscriptionCompleted:
    """A final as the client gets it: times moved onto the session's timeline."""
    words = [
        m.Word(w.word, w.start_ms + offset_ms, w.end_ms + offset_ms, w.confidence)
        for w in event.words
    ]
    return m.TranscriptionCompleted(
        utterance_id, event.text, event.start_ms + offset_ms, event.end_ms + offset_ms, words
    )
