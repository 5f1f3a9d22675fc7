"""The provider interface: one speech engine behind one small API.

An :class:`STT` is created once per server and knows its models and whether it
can serve (credentials present, weights loaded).  For each session it opens a
:class:`RecognizeStream`: audio goes in with :meth:`RecognizeStream.push_audio`
(int16 mono at the rate the engine asked for), :class:`SpeechEvent` objects come
out by iterating the stream.  :meth:`RecognizeStream.end_input` finalizes what
is pending and makes iteration stop after the last event;
:meth:`RecognizeStream.aclose` drops everything at once.

Adapters subclass :class:`RecognizeStream` and write :meth:`RecognizeStream._run`
plus :meth:`RecognizeStream._on_audio` (and, for engines whose input side rarely
waits, :meth:`RecognizeStream._take_audio`); the base class owns the task, the bounded
event channel and the error path, so every provider behaves the same way when
it fails: iteration raises :class:`~transcribe_gateway.exceptions.ProviderError`.
That holds for the input side too: an exception from ``_on_audio``,
``_take_audio`` or ``_on_end_input`` ends the stream as one from ``_run`` does
(a plain exception becomes ``ProviderError("internal engine error: ...")``), so
the session gets ``provider_error`` and switches to its fallback.

:meth:`STT.open_stream` returns a started stream: it creates the stream, does
what must come first (connect), then calls :meth:`RecognizeStream.start`, which
runs ``_run`` in the stream's task.  A stream returned unstarted is started by
its first use (push, end of input or iteration), but only ``open_stream`` can
report a failure to connect as the session's provider failing to open.

Providers are found through the ``transcribe_gateway.providers`` entry point
group and the ``plugins`` setting (see :mod:`transcribe_gateway.providers.registry`);
a provider's name is its class's :attr:`STT.provider`, upper-cased.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.exceptions import ProviderError

if TYPE_CHECKING:
    from transcribe_gateway.config import Settings

log = logging.getLogger(__name__)

EVENT_QUEUE_SIZE: Final = 256


class SpeechEventType(enum.Enum):
    SPEECH_STARTED = "speech_started"
    PARTIAL = "partial"
    FINAL = "final"
    SPEECH_STOPPED = "speech_stopped"


@dataclass(frozen=True, slots=True)
class WordTiming:
    word: str
    start_ms: int
    end_ms: int
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class SpeechEvent:
    """One thing the engine noticed.

    Times are milliseconds from the first sample pushed into this stream.
    ``utterance`` numbers the stream's utterances from 0; the connection maps
    them to the session's utterance ids.
    """

    type: SpeechEventType
    utterance: int
    text: str = ""
    start_ms: int = 0
    end_ms: int = 0
    words: tuple[WordTiming, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What a session asks of the engine (defaults already filled in)."""

    model: str
    language: str = "en"
    prompt: str | None = None
    sample_rate: int = 16000
    """Rate of the audio pushed into the stream: the engine's own ``input_rate``."""
    source_rate: int = 16000
    """Rate the client sends; the gateway resampled it to ``sample_rate`` (at 8 kHz
    and below, a phone line's band: a VAD reading it adapts, see ``audio/vad.py``)."""
    endpointing_ms: int = 500
    endpointing_unfinished_ms: int | None = None
    """Silence that ends an utterance whose text does not end a sentence (at least
    ``endpointing_ms``); ``None``: every utterance ends at ``endpointing_ms``."""
    vad_threshold: float = 0.5
    vad_prefix_padding_ms: int = 300
    vad_min_speech_ms: int = 100
    session_id: str = ""
    """The session it serves. A session's update opens its new stream while its old
    one finishes: an engine that counts its sessions (capacity) counts it once."""


def primary_subtag(tag: str) -> str:
    """A BCP-47 tag's language, case-folded: ``"EN-us"`` -> ``"en"`` (tags ignore case)."""
    return tag.split("-")[0].casefold()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model an engine offers, and what it can honour."""

    name: str
    description: str = ""
    languages: tuple[str, ...] | None = None
    """Supported BCP-47 languages; ``None`` means any (with ``multi`` for auto-detect).

    Only the language itself counts: a request matches a declared tag when their
    primary subtags agree, whatever the case or region on either side (a model
    declaring ``"en-US"`` serves ``en-US``, ``en``, ``EN-gb``).  The first one is the
    language a request it cannot serve (``multi`` on a model that cannot detect)
    is transcribed in."""
    input_rate: int = 16000
    """Sample rate the engine wants; the session resamples to it."""
    supports_prompt: bool = True
    supports_endpointing: bool = True
    supports_vad: bool = True
    supports_endpointing_unfinished: bool = False
    """Can hold an utterance whose text does not end a sentence (semantic endpointing)."""
    extra: dict[str, str] = field(default_factory=dict)

    def has_language(self, tag: str) -> bool:
        """Whether a session asking for BCP-47 ``tag`` gets its language (see ``languages``)."""
        if self.languages is None:
            return True
        return primary_subtag(tag) in {primary_subtag(own) for own in self.languages}


class STT(abc.ABC):
    """A speech engine (one per server process)."""

    provider: ClassVar[str]
    """Name used in ``session.provider``, e.g. ``DEEPGRAM``: required, upper case
    (the registry upper-cases it, and names the engine so); ``LOCAL`` is the
    embedded engine's and is refused to a plugin.  A plugin with the name of
    another engine replaces it (with a warning in the log)."""

    def __init__(self, settings: Settings) -> None:
        """Created once at server start, before :meth:`start`.  If it raises, an
        entry point's engine is logged and left out; a ``plugins`` entry's stops
        the server with a configuration error (``config check`` reports it too)."""
        self.settings = settings

    @abc.abstractmethod
    def models(self) -> Sequence[ModelInfo]:
        """Models this engine offers.  Called per request: keep it cheap.  If it
        raises, the engine is listed as unavailable and its sessions refused."""

    def unavailable_reason(self) -> str | None:
        """``None`` when the engine can serve, else why not (e.g. a missing key)."""
        return None

    def find_model(self, name: str) -> ModelInfo | None:
        """The model called ``name``, if this engine offers it."""
        return next((m for m in self.models() if m.name == name), None)

    async def start(self) -> None:
        """Prepare at server start (load weights, warm up).  Default: nothing.

        If it raises, the failure is logged and the engine left out (unavailable,
        its sessions refused); the server starts with the others.
        """

    def is_ready(self) -> bool:
        """Whether :meth:`start` finished."""
        return True

    @abc.abstractmethod
    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        """Open a recognition stream for one session, and start it.

        Create the stream, connect or reserve what it needs, then call its
        :meth:`RecognizeStream.start` before returning it::

            stream = MyStream(self, options)
            stream.start()
            return stream

        Raises:
            ProviderAtCapacity: the engine has all the sessions it can serve
                (counted as a refusal by a limit, not as a failure).
            ProviderUnavailable: the engine cannot take this session (not set up).
            ProviderError: the engine could not be reached or refused.
        """

    async def aclose(self) -> None:
        """Release everything at server shutdown.  Default: nothing."""


class RecognizeStream(abc.ABC):
    """One session's recognition: audio in, :class:`SpeechEvent` out.

    The event channel is bounded; an adapter that produces faster than the
    session consumes waits in :meth:`_emit`.
    """

    def __init__(self, stt: STT, options: StreamOptions) -> None:
        self._stt = stt
        self._options = options
        self._events: asyncio.Queue[SpeechEvent | BaseException | None] = asyncio.Queue(
            EVENT_QUEUE_SIZE
        )
        self._input_ended = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._input_error: ProviderError | None = None
        """The input side's failure (:meth:`_on_audio`, :meth:`_take_audio`,
        :meth:`_on_end_input` raised): it ended the stream, iteration raises it."""
        self._running = False
        """The task is in :meth:`_run` (a failure of the input side cancels it then)."""

    @property
    def options(self) -> StreamOptions:
        return self._options

    def start(self) -> None:
        """Start the adapter's main task (:meth:`_run`).

        :meth:`STT.open_stream` calls it before returning the stream, once the
        engine is ready for audio.  A stream returned unstarted is started by its
        first :meth:`push_audio`, :meth:`push_audio_nowait`, :meth:`end_input` or
        iteration (otherwise nothing would ever run :meth:`_run`: no events, and
        a push waiting on backpressure for ever).  A second call does nothing.
        """
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._main(), name=f"{self._stt.provider}-stream"
        )

    def _ensure_started(self) -> None:
        if self._task is None and not self._closed:
            self.start()

    def _as_provider_error(self, exc: Exception) -> ProviderError:
        """An adapter's exception as the gateway reports it: a bug becomes
        ``internal engine error`` (translated once, here, for every adapter)."""
        if isinstance(exc, ProviderError):
            return exc
        error = ProviderError(self._stt.provider, f"internal engine error: {exc!r}")
        error.__cause__ = exc
        return error

    async def _main(self) -> None:
        outcome: ProviderError | None = None
        # The input side may fail before this task first runs (a burst of
        # push_audio_nowait): then _run never starts, and that failure is the outcome.
        self._running = self._input_error is None
        try:
            if self._running:
                await self._run()
        except asyncio.CancelledError:
            if self._input_error is None or self._closed:
                raise
            # Cancelled by _input_failed, not by aclose: the stream ends with that error.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as exc:
            outcome = self._as_provider_error(exc)
        # Not cancelled from here on: the outcome must reach the consumer.
        self._running = False
        # An input-side failure stopped _run (or came first): it is the one reported.
        await self._events.put(self._input_error or outcome)

    def stop_with_error(self, error: ProviderError) -> None:
        """The gateway gives up on this stream (it stopped taking audio): iteration
        raises ``error``, and a push or end of input waiting on it returns."""
        self._input_failed(error)

    def _input_failed(self, exc: Exception) -> None:
        """The adapter's input side raised: the stream has failed, as if :meth:`_run` had.

        Iteration then raises the error (``provider_error``, and the session's
        fallback), the same path a failing :meth:`_run` takes.
        """
        if not isinstance(exc, ProviderError):  # a bug: its traceback is for the operator
            log.warning("%s stream failed taking its input", self._stt.provider, exc_info=exc)
        if self._input_error is None:
            self._input_error = self._as_provider_error(exc)
        if self._task is not None and self._running:
            self._task.cancel()

    @abc.abstractmethod
    async def _run(self) -> None:
        """Produce events with :meth:`_emit` until the input has ended and all is final."""

    @abc.abstractmethod
    async def _on_audio(self, samples: Samples) -> None:
        """Take one chunk (may wait: that is the backpressure).  Raising fails the
        stream as :meth:`_run` raising does."""

    async def _on_end_input(self) -> None:
        """Called once when no more audio will come.  Raising fails the stream."""

    async def _emit(self, event: SpeechEvent) -> None:
        await self._events.put(event)

    def _event_room(self) -> int:
        """Free places in the event channel: what :meth:`_take_audio` may emit."""
        return EVENT_QUEUE_SIZE - self._events.qsize()

    def _emit_nowait(self, event: SpeechEvent) -> None:
        """:meth:`_emit` for :meth:`_take_audio`, which checked :meth:`_event_room` first."""
        self._events.put_nowait(event)

    @property
    def input_ended(self) -> bool:
        return self._input_ended

    def progress_at(self) -> float:
        """``time.monotonic()`` of the engine's last sign of life besides an event (0: none).

        The gateway gives up on a finalizing stream that shows no progress for
        ``drain_timeout_s``.  An engine that works through other sessions'
        backlog before this one's last decode (the embedded engines' shared
        pool) reports that work here, so it is not taken for a dead provider.
        """
        return 0.0

    async def push_audio(self, samples: Samples) -> None:
        """Send int16 mono samples at ``options.sample_rate``.

        Raises:
            RuntimeError: after :meth:`end_input` or :meth:`aclose`, or once the
                stream's task has ended or :meth:`_on_audio` raised (it failed:
                iterating gives the error).
        """
        if self._input_ended or self._closed or self._input_error is not None:
            raise RuntimeError("stream input has ended")
        self._ensure_started()
        try:
            taken = await self._unless_ended(self._on_audio(samples))
        except Exception as exc:  # not CancelledError: the caller's own stays its own
            self._input_failed(exc)
            raise RuntimeError("the stream has ended") from exc
        if not taken:
            raise RuntimeError("the stream has ended")

    async def _unless_ended(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` (taking audio, or the end of it) unless the stream's task ends
        first; returns False if it did.

        ``work`` may wait on the engine's backpressure (a full queue) for the
        task to take from it. A task that failed or was closed never will, and
        the wait would hang, and with it the client's later messages. So the
        task's end interrupts it: it cancels the waiting caller, and that one
        cancellation becomes the False. Not a task racing the work: some engines
        take every chunk here (a task per chunk cost ~10 us of the ~15 us a
        chunk costs the gateway).
        """
        main, caller = self._task, asyncio.current_task()
        if main is None or caller is None:  # not started: nothing can end it meanwhile
            await work
            return True
        if main.done():
            work.close()
            return False
        waiting, ended = True, False

        def interrupt(_: object) -> None:
            nonlocal ended
            if waiting:  # a callback already due when the work ended must not fire
                ended = True
                caller.cancel()

        main.add_done_callback(interrupt)
        try:
            await work
        except asyncio.CancelledError:
            # Ours alone: the stream ended. Another's too (the caller itself is
            # being cancelled): it stands.
            if ended and caller.uncancel() == 0:
                return False
            raise
        finally:
            waiting = False
            main.remove_done_callback(interrupt)
        return True

    def push_audio_nowait(self, samples: Samples) -> bool:
        """Hand over a chunk if the engine can take it without waiting.

        The gateway calls this first for every chunk, on the event loop, and
        only when it returns False does it await :meth:`push_audio` (in a task,
        holding the client's later messages back).  Returns whether the chunk
        was taken; False means nothing of it was.

        Raises:
            RuntimeError: after :meth:`end_input` or :meth:`aclose`, or when
                :meth:`_take_audio` raised (the stream failed: iterating gives the error).
        """
        if self._input_ended or self._closed or self._input_error is not None:
            raise RuntimeError("stream input has ended")
        self._ensure_started()
        try:
            return self._take_audio(samples)
        except Exception as exc:
            self._input_failed(exc)
            raise RuntimeError("the stream has ended") from exc

    def _take_audio(self, samples: Samples) -> bool:
        """The fast path of :meth:`_on_audio`: take the chunk now, or return False.

        Adapters whose input side rarely waits override this (no task per
        chunk); the default sends every chunk through :meth:`_on_audio`.
        """
        return False

    async def end_input(self) -> None:
        """No more audio: finalize pending speech; iteration ends after the last event."""
        if self._input_ended or self._closed:
            return
        self._input_ended = True
        self._ensure_started()
        try:
            await self._unless_ended(self._on_end_input())
        except Exception as exc:  # reported by iteration, as a failing _run is
            self._input_failed(exc)

    def __aiter__(self) -> AsyncIterator[SpeechEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SpeechEvent]:
        self._ensure_started()
        while True:
            item = await self._events.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        """Stop at once and free every resource (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._input_ended = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        # Wake a consumer still iterating: nothing more will come.
        while True:
            try:
                self._events.put_nowait(None)
                break
            except asyncio.QueueFull:
                self._events.get_nowait()
        try:
            await self._on_close()
        except Exception:  # an adapter's bug must not keep its session from ending
            log.warning("%s stream failed to close cleanly", self._stt.provider, exc_info=True)

    async def _on_close(self) -> None:
        """Free adapter resources (called once, after the main task is gone)."""
