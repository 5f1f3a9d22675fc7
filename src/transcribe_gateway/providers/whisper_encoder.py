"""Where Whisper's encoder runs, and where a decode nobody waits for stops.

faster-whisper encodes each 30 s window through its model's ``encode``;
:class:`Encoder` takes that method over, so its ``transcribe()`` (prompting,
fallback, word timing) stays whole while the encode is shortened, moved to the
replica that runs on every core, or skipped for a decode that was abandoned.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Final

import numpy as np

FRAMES_PER_S: Final = 100
"""Whisper's log-mel frames per second of audio."""


class Abandoned(Exception):
    """Raised inside faster-whisper's transcribe() to stop a decode nobody awaits."""


class Encoder:
    """Where Whisper's encoder runs, and where an abandoned decode stops.

    A decode is the encoder on a 30 s window (~0.4 s on one thread here) and
    then the token-by-token decoder (0.1-0.25 s); a partial's window is
    shortened to its audio and ``SHORT_PADDING_MS`` (:meth:`decoding`), as is
    a final's with earlier speech before it, or when the pool is behind.
    The encoder is large matrix products that scale with threads (half the
    time on two); the decoder's small steps do not (two threads made it
    slower; bench/whisper_threads.py).
    So the pool's one-thread replicas decode as before, and the encode of a
    decode that is the only one under way runs on an extra replica with a
    thread per worker.  Only then: beside other work its threads wait for
    each other's core, and it is no faster than on one thread.

    A decode whose result is no longer wanted (a partial overtaken by its
    final, a speculative final whose silence ended) cannot be interrupted
    inside CTranslate2, but it stops after its encode instead of going on to
    the decoder, and it does not count as under way.  An encode waits for the
    extra replica, rather than compete with it, while that replica finishes
    such a decode's encode.  BENCHMARKS.md, *The encoder on every core*.
    """

    def __init__(self, model: Any, path: str, threads: int) -> None:
        self._narrow = model.encode  # faster-whisper's: the pool's replicas
        self._wide: Any = None
        if threads > 1:
            import ctranslate2

            self._wide = ctranslate2.models.Whisper(
                path, device="cpu", compute_type="int8", inter_threads=1, intra_threads=threads
            )
        self._changed = threading.Condition()
        self._holder: threading.Event | None = None
        """The ``abandoned`` flag of the decode encoding on the extra replica."""
        self._decoding: list[threading.Event] = []
        """The ``abandoned`` flags of the decodes under way."""
        self._calls = threading.local()
        self.short_encodes = 0
        """Encodes of a shortened window (for tests and benchmarks)."""
        self.wide_encodes = 0
        """Encodes that ran on the extra replica (for tests and benchmarks)."""
        self.stopped = 0
        """Abandoned decodes that stopped here instead of running to the end."""
        # faster-whisper encodes each window through this method; routing it
        # here keeps its transcribe() (prompting, fallback, word timing) whole.
        model.encode = self.encode

    @contextlib.contextmanager
    def decoding(self, abandoned: threading.Event, padding_ms: int | None = None) -> Iterator[None]:
        """Mark the calling thread's decode, for :meth:`encode` to route and stop.

        ``padding_ms``: encode each window's audio and at most this much of its
        padding (None: the whole window).
        """
        self._calls.abandoned = abandoned
        self._calls.padding = None if padding_ms is None else padding_ms * FRAMES_PER_S // 1000
        with self._changed:
            self._decoding.append(abandoned)
        try:
            yield
        finally:
            del self._calls.abandoned, self._calls.padding
            with self._changed:
                self._decoding.remove(abandoned)

    def _shortened(self, features: np.ndarray) -> np.ndarray:
        """``features`` without the padding past what the calling decode keeps."""
        padding: int | None = getattr(self._calls, "padding", None)
        if padding is None:
            return features
        # faster-whisper pads a window's log-mel frames with zeros (pad_or_trim); a
        # frame of audio, even digital silence, is never all zeros.
        voiced = np.flatnonzero(features.reshape(-1, features.shape[-1]).any(axis=0))
        keep = int(voiced[-1]) + 1 + padding if len(voiced) else padding
        keep += keep % 2  # the encoder's stride is 2
        if keep >= features.shape[-1]:
            return features
        return np.ascontiguousarray(features[..., :keep])

    def encode(self, features: np.ndarray) -> Any:
        from faster_whisper.transcribe import get_ctranslate2_storage

        abandoned: threading.Event = getattr(self._calls, "abandoned", None) or threading.Event()
        shortened = self._shortened(features)
        with self._changed:
            self.short_encodes += shortened is not features
            features = shortened
            self._changed.wait_for(lambda: self._holder is None or not self._holder.is_set())
            if abandoned.is_set():
                self.stopped += 1
                raise Abandoned
            wide = self._wide is not None and not any(
                other is not abandoned and not other.is_set() for other in self._decoding
            )
            if wide:
                self._holder = abandoned
                self.wide_encodes += 1
        try:
            if not wide:
                output = self._narrow(features)
            else:
                if features.ndim == 2:
                    features = np.expand_dims(features, 0)
                output = self._wide.encode(get_ctranslate2_storage(features))
        finally:
            if wide:
                with self._changed:
                    self._holder = None
                    self._changed.notify_all()
        if abandoned.is_set():
            with self._changed:
                self.stopped += 1
            raise Abandoned
        return output
