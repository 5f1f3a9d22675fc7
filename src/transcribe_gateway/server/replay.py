"""Audio kept for a fallback: what a failed provider has not made final yet.

The session appends every chunk it accepts (decoded, at the client's rate) and
trims up to the end of each ``transcription.completed``.  If the provider
fails, what is left is exactly the audio whose words have not been delivered,
and it is replayed into the fallback engine.  The buffer is bounded in
seconds: a provider that never finalizes cannot make it grow without limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from transcribe_gateway.audio.decode import Samples


class ReplayBuffer:
    """Chunks of one session's audio since the last final, with their times."""

    def __init__(self, rate: int, max_seconds: float, start_sample: int = 0) -> None:
        """``start_sample``: where the session's audio stands as the buffer begins."""
        self.rate = rate
        self._next_sample = start_sample
        """Where the next chunk will start in the session (the end of the last one)."""
        self._max_samples = int(max_seconds * rate)
        self._chunks: deque[tuple[int, Samples]] = deque()
        """(index of the chunk's first sample in the session, samples)."""
        self._gone = 0
        """Chunks removed from the front so far: the first one's number in the session."""
        self._samples = 0
        self.dropped_samples = 0
        """Oldest audio dropped because the buffer was full."""
        self._final_sample: int | None = None
        """Where the last final ended (the trim point), in samples of the session;
        before any, where the buffer began (a session reconfigured later starts one)."""

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def start_ms(self) -> int:
        """Where the buffered audio starts in the session (ms); empty, where the
        next chunk will (every word so far is final: a fallback starts there)."""
        first = self._chunks[0][0] if self._chunks else self._next_sample
        return first * 1000 // self.rate

    @property
    def lost_ms(self) -> int:
        """Audio since the last final that is no longer held (the buffer overflowed):
        a fallback cannot be given it."""
        if not self._chunks or self._final_sample is None:
            return 0
        return max(0, (self._chunks[0][0] - self._final_sample) * 1000 // self.rate)

    def append(self, first_sample: int, samples: Samples) -> None:
        if self._final_sample is None:
            self._final_sample = first_sample
        self._chunks.append((first_sample, samples))
        self._samples += len(samples)
        self._next_sample = first_sample + len(samples)
        while self._samples > self._max_samples and len(self._chunks) > 1:
            _, dropped = self._chunks.popleft()
            self._gone += 1
            self._samples -= len(dropped)
            self.dropped_samples += len(dropped)

    def trim_before(self, ms: int) -> None:
        """Forget audio that ends at or before ``ms`` (its words are final)."""
        limit = ms * self.rate // 1000
        self._final_sample = max(self._final_sample or 0, limit)
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= limit:
            _, gone = self._chunks.popleft()
            self._gone += 1
            self._samples -= len(gone)

    def unplayed(self) -> Iterator[tuple[int, Samples]]:
        """The chunks in order, from the oldest, until none is left: including those
        appended while the caller waits between two, each once; each with the index
        of its first sample in the session.

        A position, not an index: a full buffer drops its oldest chunks as new
        ones come, which shifts every index, and an index would then skip one
        unplayed chunk per chunk dropped (the ones dropped are those already
        replayed, unless the reader is slower than the audio comes).
        """
        number = self._gone  # the next chunk's, counted from the session's first
        while (index := max(number - self._gone, 0)) < len(self._chunks):
            number = self._gone + index + 1
            yield self._chunks[index]

    def __iter__(self) -> Iterator[Samples]:
        return (samples for _, samples in self._chunks)

    def clear(self) -> None:
        self._gone += len(self._chunks)
        self._chunks.clear()
        self._samples = 0
