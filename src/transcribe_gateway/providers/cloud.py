"""What every cloud adapter shares: one WebSocket to the provider per session.

An adapter is one module with two small classes:

* a :class:`CloudSTT` subclass: provider name, default base URL, models;
* a :class:`CloudStream` subclass: the provider's protocol, written as hooks
  (:meth:`~CloudStream.url`, :meth:`~CloudStream.headers`,
  :meth:`~CloudStream.on_open`, :meth:`~CloudStream.audio_frame`,
  :meth:`~CloudStream.keepalive_frame`, :meth:`~CloudStream.finalize_frames`,
  :meth:`~CloudStream.on_message`).

This module owns everything that must not differ between providers, because
each item is a way existing integrations lose words or hang:

* every wait on the network is bounded: connecting and the handshake
  (``provider_connect_timeout_s``), each send, the answer to audio
  (``provider_response_timeout_s``: a provider that stops answering is a
  failure, so a fallback can take over), the answer to the finalize at the end
  (``provider_finalize_timeout_s``);
* audio is batched into frames of ``chunk_ms`` and sent by one task through a
  bounded queue, so a slow provider slows the client (TCP) instead of growing
  memory; a keepalive goes out when no audio has been sent for
  ``keepalive_interval_s``;
* at the end of input the stream sends the provider's finalize message and keeps
  reading until the provider says it is done, so trailing words are never
  clipped; if it never answers, or closes before saying so, the stream fails
  (and the session delivers the last partial as the final, or replays to a
  fallback);
* a deadline counts from when a provider transcribing at real time can have
  heard the audio before what it answers: a client that sends a file faster
  than real time puts seconds of audio ahead of a flush, and a healthy
  provider reaches the flush only that much later;
* results become our events through :class:`Utterances`, which accumulates the
  provider's pieces so a partial is always the whole utterance so far and each
  utterance gets exactly one final, even when it arrives after speech stopped.

Credentials and base URLs come from ``<PROVIDER>_API_KEY`` / ``<PROVIDER>_BASE_URL``
or ``[providers.<PROVIDER>]`` in the config file, never from clients.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.exceptions import (
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
)
from transcribe_gateway.logfields import Fields
from transcribe_gateway.providers.base import (
    STT,
    ModelInfo,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
    WordTiming,
)

log = logging.getLogger(__name__)

Frame = str | bytes
OUTBOX_FRAMES = 64
"""Frames waiting to be sent to the provider before ``push_audio`` waits (at
least; an adapter with short frames holds :data:`OUTBOX_MS` of them)."""
OUTBOX_MS = 3200
"""Audio waiting to be sent before ``push_audio`` waits, for short frames: a
client's long chunk (up to this) is still taken without waiting."""
REFUSED_STATUSES = frozenset({401, 403})
"""HTTP statuses (at the upgrade or in a provider's error) that refuse the key."""


class CloudSTT(STT):
    """A cloud provider: credentials, base URL and models."""

    default_base_url: ClassVar[str]
    """e.g. ``wss://api.deepgram.com``; ``<PROVIDER>_BASE_URL`` replaces it."""
    model_infos: ClassVar[tuple[ModelInfo, ...]]
    stream_class: ClassVar[type[CloudStream]]

    def models(self) -> Sequence[ModelInfo]:
        return self.model_infos

    @property
    def api_key(self) -> str | None:
        return self.settings.provider_setting(self.provider, "api_key")

    @property
    def base_url(self) -> str:
        configured = self.settings.provider_setting(self.provider, "base_url")
        return (configured or self.default_base_url).rstrip("/")

    def unavailable_reason(self) -> str | None:
        if not self.api_key:
            return f"{self.provider}_API_KEY is not set"
        return None

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        stream = self.stream_class(self, options)
        await stream.connect()
        stream.start()
        return stream


@dataclass(frozen=True, slots=True)
class Piece:
    """A finalized piece of an utterance, as the provider sent it."""

    text: str
    start_ms: int
    end_ms: int
    words: tuple[WordTiming, ...] = ()


class Utterances:
    """Turns a provider's pieces into our per-utterance events.

    Call :meth:`speech_started` / :meth:`speech_stopped` for the provider's VAD
    events, :meth:`interim` for a non-final hypothesis of the rest of the
    utterance, :meth:`commit` for a finalized piece, :meth:`complete` at the
    provider's end of utterance.  A partial is always the committed pieces
    plus the current interim; the final is all committed pieces (and the
    interim, if the provider never finalized it: better a word at lower
    confidence than a lost one).  Speech stopped before the final keeps the
    utterance open until the final arrives (or the next utterance begins), and
    its ``SPEECH_STOPPED`` waits for that final: docs/protocol.md promises
    started, partials, completed, stopped within an utterance.

    Pieces are words or phrases by default: each is stripped and they are
    joined with a space.  With ``verbatim``, pieces are deltas of one text
    (Cartesia's, whose own spacing may split a word between two pieces):
    they are concatenated exactly as sent, and only the whole utterance's
    text is stripped at its ends.
    """

    def __init__(
        self, emit: Callable[[SpeechEvent], Awaitable[None]], *, verbatim: bool = False
    ) -> None:
        self._emit = emit
        self.verbatim = verbatim
        """Concatenate pieces as sent instead of stripping and spacing them."""
        self.index = 0
        self._pieces: list[Piece] = []
        self._interim = ""
        self._interim_start = 0
        self._started_at: int | None = None
        self._stopped = False
        """The provider said speech stopped (our event may still wait for the final)."""
        self._stop_ms = 0
        self._finalized = False
        self.last_end_ms = 0

    @property
    def text(self) -> str:
        """The current utterance so far (committed pieces and interim)."""
        parts = [p.text for p in self._pieces]
        if self._interim:
            parts.append(self._interim)
        return self._join(parts)

    @property
    def open(self) -> bool:
        """Whether an utterance has begun and is not both final and stopped."""
        return self._started_at is not None

    async def speech_started(self, start_ms: int) -> None:
        if self._started_at is not None and (self._stopped or self._finalized):
            await self._close_current()
        if self._started_at is None:
            await self._start(start_ms)

    async def interim(self, text: str, start_ms: int | None = None) -> None:
        if not text.strip():
            return
        await self._ensure_started(start_ms)
        if not self._interim:
            self._interim_start = start_ms if start_ms is not None else self.last_end_ms
        self._interim = text
        await self._partial()

    async def commit(
        self, text: str, start_ms: int, end_ms: int, words: Sequence[WordTiming] = ()
    ) -> None:
        self._interim = ""
        if not text.strip():
            if self.verbatim and text and self._pieces and not self._finalized:
                # A space between two deltas is part of the text (no time of its own).
                end = self._pieces[-1].end_ms
                self._pieces.append(Piece(text, end, end))
            return
        await self._ensure_started(start_ms)
        piece = text if self.verbatim else text.strip()
        self._pieces.append(Piece(piece, start_ms, end_ms, tuple(words)))
        self.last_end_ms = max(self.last_end_ms, end_ms)
        await self._partial()

    async def complete(self, end_ms: int | None = None) -> None:
        """The provider ended the utterance: emit its final (if it said anything)."""
        if self._interim:
            await self.commit(self._interim, self._interim_start, end_ms or self.last_end_ms)
        if not self._pieces:
            if self._stopped:  # it said nothing after all: the stop waited for nothing
                await self._stop()
            return
        first, last = self._pieces[0], self._pieces[-1]
        await self._emit(
            SpeechEvent(
                SpeechEventType.FINAL,
                self.index,
                text=self._join(p.text for p in self._pieces),
                start_ms=first.start_ms,
                end_ms=max(last.end_ms, end_ms or 0),
                words=tuple(w for p in self._pieces for w in p.words),
            )
        )
        self._pieces.clear()
        self._finalized = True
        if self._stopped:
            await self._stop()

    async def speech_stopped(self, end_ms: int) -> None:
        if self._started_at is None or self._stopped:
            return
        self._stopped, self._stop_ms = True, end_ms
        if self._finalized or not (self._pieces or self._interim):
            await self._stop()
        # Else it waits for the final (complete), or the next utterance's start.

    async def _stop(self) -> None:
        await self._emit(
            SpeechEvent(SpeechEventType.SPEECH_STOPPED, self.index, end_ms=self._stop_ms)
        )
        self._advance()

    async def flush(self, end_ms: int | None = None) -> None:
        """End of stream: finalize and close whatever is open."""
        if self._started_at is not None:
            await self._close_current(end_ms)

    async def _close_current(self, end_ms: int | None = None) -> None:
        await self.complete(end_ms)
        if self._started_at is not None:  # not advanced by complete(): not yet stopped
            await self.speech_stopped(max(end_ms or 0, self.last_end_ms))

    async def _ensure_started(self, start_ms: int | None) -> None:
        if self._started_at is not None and self._finalized:
            await self._close_current()  # a new utterance after the last one's final
        if self._started_at is None:
            await self._start(start_ms if start_ms is not None else self.last_end_ms)

    def _join(self, parts: Iterable[str]) -> str:
        if self.verbatim:
            return "".join(parts).strip()
        return " ".join(part.strip() for part in parts if part.strip())

    async def _start(self, start_ms: int) -> None:
        self._started_at = start_ms
        await self._emit(SpeechEvent(SpeechEventType.SPEECH_STARTED, self.index, start_ms=start_ms))

    async def _partial(self) -> None:
        await self._emit(SpeechEvent(SpeechEventType.PARTIAL, self.index, text=self.text))

    def _advance(self) -> None:
        self.index += 1
        self._pieces.clear()
        self._interim = ""
        self._started_at = None
        self._stopped = False
        self._finalized = False


class CloudStream(RecognizeStream):
    """One session's connection to a cloud provider.

    Subclasses implement the provider's protocol through the hooks below and
    report results through :attr:`utterances`.  They never touch the socket
    directly except in :meth:`on_open` (``await self.send(...)`` and
    ``await self.receive()`` for a handshake).
    """

    chunk_ms: ClassVar[int] = 50
    """Audio per frame sent to the provider (providers advise 20-100 ms)."""
    keepalive_interval_s: ClassVar[float | None] = 5.0
    """Send :meth:`keepalive_frame` after this long without audio (``None``: never)."""
    answers_continuously: ClassVar[bool] = True
    """Whether the provider answers all audio, speech or not (Deepgram, Soniox).
    Then an answer is due once ``unanswered_audio_ms`` of audio went without
    one, and must come within the response timeout.  If not, the adapter calls
    :meth:`expect_answer` where an answer is due (e.g. after its VAD heard
    speech stop) and :meth:`answered` when it comes."""
    unanswered_audio_ms: ClassVar[int] = 2000
    """Audio a provider may hold without answering (it may keep the last
    fraction of a second until more audio or a finalize arrives, so a client's
    pause right after speech must not look like a dead provider)."""
    close_is_done: ClassVar[bool] = False
    """Whether the provider's close after the finalize is its only "done"
    (Deepgram Flux sends no last message).  Otherwise :meth:`on_message` sees
    the provider's done message, and a close before it is a failure: the words
    it had not sent yet are lost, so the session's fallback must replay them."""

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self.cloud = stt
        self.settings = stt.settings
        self.utterances = Utterances(self._emit)
        self._ws: ClientConnection | None = None
        self._outbox: asyncio.Queue[tuple[Frame, float] | None] = asyncio.Queue(
            max(OUTBOX_FRAMES, OUTBOX_MS // self.chunk_ms)
        )
        """Frames for the sender, each with the milliseconds of audio it carries."""
        self._batch = bytearray()
        self._batch_bytes = max(2, options.sample_rate * self.chunk_ms // 1000 * 2)
        self._answer_due: float | None = None
        self._unanswered_ms = 0.0
        self._finalizing = False
        self._sender: asyncio.Task[None] | None = None
        self.sent_ms = 0.0
        """Milliseconds of audio handed to the sender so far (the stream's clock)."""
        self._out_ms = 0.0
        """Milliseconds of audio the sender has sent (the rest waits in the outbox)."""
        self._heard_at = 0.0
        """Loop time at which a provider transcribing at real time has heard all
        the audio sent (it hears each frame after the ones before it)."""
        self.last_error: ProviderError | None = None
        """The provider's last error that did not end the stream (an adapter sets
        it); a close that follows fails the stream with it."""
        self.log = Fields(log, {"provider": stt.provider})

    # -- hooks for adapters -------------------------------------------------

    @abc.abstractmethod
    def url(self) -> str:
        """The full WebSocket URL, query parameters included."""

    def headers(self) -> dict[str, str]:
        """HTTP headers of the upgrade request (auth, usually)."""
        return {}

    def subprotocols(self) -> Sequence[str] | None:
        return None

    async def on_open(self) -> None:
        """After connecting: send the session config, await a handshake if any."""

    @abc.abstractmethod
    def audio_frame(self, pcm16: bytes) -> Frame:
        """One frame of little-endian pcm16 at ``options.sample_rate``, as the provider wants it."""

    def keepalive_frame(self) -> Frame | None:
        """What keeps an idle connection open (``None``: WebSocket pings suffice)."""
        return None

    @abc.abstractmethod
    def finalize_frames(self) -> Sequence[Frame]:
        """Sent after the last audio: flush everything, then end the stream."""

    @abc.abstractmethod
    async def on_message(self, message: Frame) -> bool:
        """Handle one provider message; return True when the provider is done (all final)."""

    # -- helpers for adapters ------------------------------------------------

    @property
    def api_key(self) -> str:
        return self.cloud.api_key or ""

    @property
    def base_url(self) -> str:
        return self.cloud.base_url

    async def send(self, frame: Frame) -> None:
        assert self._ws is not None
        async with asyncio.timeout(self.settings.provider_response_timeout_s):
            await self._ws.send(frame)

    async def queue(self, frame: Frame) -> None:
        """Send a control frame in order with the audio (e.g. a finalize at end of speech)."""
        await self._flush_batch()  # the audio before it goes first
        await self._enqueue((frame, 0.0))

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.send(json.dumps(payload))

    async def receive(self) -> Frame:
        """Next provider message, within the connect timeout (for handshakes)."""
        assert self._ws is not None
        async with asyncio.timeout(self.settings.provider_connect_timeout_s):
            return await self._ws.recv()

    def expect_answer(self) -> None:
        """An answer is due: fail if none comes within the response timeout.

        Counted from when a provider transcribing at real time can have heard
        all the audio handed over so far (:meth:`_heard_by`), not from now.
        """
        if self._answer_due is None:
            self._answer_due = self._heard_by() + self.settings.provider_response_timeout_s

    def answered(self) -> None:
        self._answer_due = None
        self._unanswered_ms = 0.0

    def fail(self, message: str, *, retryable: bool = True) -> ProviderError:
        """An error to raise from a hook, naming this provider."""
        return ProviderError(self.cloud.provider, message, retryable=retryable)

    def fail_status(self, detail: str, code: object) -> ProviderError:
        """An error the provider reported with an HTTP status code (``None``: none given).

        401/403 refuse the key; any other 4xx but 408 and 429 is the request's
        fault, so a retry would fail the same way.
        """
        if code in REFUSED_STATUSES:
            return self.fail(f"authentication refused ({detail})", retryable=False)
        retryable = not isinstance(code, int) or code in (408, 429) or code >= 500
        return self.fail(detail, retryable=retryable)

    # -- lifecycle ---------------------------------------------------------------

    async def connect(self) -> None:
        """Open the provider connection and run :meth:`on_open`, all bounded.

        Raises:
            ProviderConnectionError: unreachable, refused or handshake failed.
        """
        provider = self.cloud.provider
        timeout = self.settings.provider_connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                self._ws = await connect(
                    self.url(),
                    additional_headers=self.headers(),
                    subprotocols=self.subprotocols(),  # type: ignore[arg-type]
                    open_timeout=None,  # bounded by the timeout around it
                    ping_interval=self.settings.provider_response_timeout_s / 2,
                    ping_timeout=self.settings.provider_response_timeout_s,
                    close_timeout=self.settings.provider_finalize_timeout_s,
                    max_size=2**22,
                )
                await self.on_open()
        except InvalidStatus as exc:
            status = exc.response.status_code
            refused = status in REFUSED_STATUSES
            raise ProviderConnectionError(
                provider,
                ("authentication refused" if refused else "connection refused")
                + f" (HTTP {status})",
                retryable=not refused,
            ) from exc
        except TimeoutError as exc:
            await self._abandon()
            raise ProviderTimeout(
                provider, f"no connection within {timeout:g} s (connect and handshake)"
            ) from exc
        except ConnectionClosed as exc:
            await self._abandon()
            raise ProviderConnectionError(
                provider, f"closed during the handshake: {_describe_close(exc)}"
            ) from exc
        except ProviderError:
            await self._abandon()
            raise
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            await self._abandon()
            raise ProviderConnectionError(provider, f"cannot connect: {exc}") from exc
        except Exception as exc:  # a handshake answer that cannot be read (not JSON, ...)
            await self._abandon()
            raise ProviderConnectionError(
                provider, f"unreadable handshake answer ({type(exc).__name__}: {exc})"
            ) from exc
        except BaseException:  # cancelled: the session ended while the provider answered
            await self._abandon()
            raise

    async def _abandon(self) -> None:
        if self._ws is not None:
            self._ws.transport.abort()  # no close handshake with a peer that misbehaves
            self._ws = None

    async def _on_audio(self, samples: Samples) -> None:
        for item in self._frames(samples):
            await self._enqueue(item)

    def _take_audio(self, samples: Samples) -> bool:
        # The outbox has room for every frame this chunk completes (the usual
        # case): no waiting, so no task for it.
        due = (len(self._batch) + 2 * len(samples)) // self._batch_bytes
        room = self._outbox.maxsize - self._outbox.qsize()
        if due > room or self._sender is None or self._sender.done():
            return False
        for item in self._frames(samples):
            self._outbox.put_nowait(item)
        return True

    def pcm16_ms(self, size: int) -> float:
        """Milliseconds of audio in ``size`` bytes of pcm16 at the stream's rate."""
        return size * 500 / self._options.sample_rate

    def _frames(self, samples: Samples) -> Iterator[tuple[Frame, float]]:
        """Batch ``samples`` into the provider's frame size; yields each full frame
        with its milliseconds of audio."""
        self._batch += samples.astype("<i2", copy=False).tobytes()
        while len(self._batch) >= self._batch_bytes:
            pcm16 = bytes(self._batch[: self._batch_bytes])
            del self._batch[: self._batch_bytes]
            ms = self.pcm16_ms(len(pcm16))
            yield self.audio_frame(pcm16), ms
            # After the frame is queued (the consumer resumes us): the stream's clock.
            self.sent_ms += ms

    async def _flush_batch(self) -> None:
        """Queue the audio short of a full frame (before a control frame, or at the end)."""
        if self._batch:
            ms = self.pcm16_ms(len(self._batch))
            await self._enqueue((self.audio_frame(bytes(self._batch)), ms))
            self.sent_ms += ms
            self._batch.clear()

    async def _enqueue(self, item: tuple[Frame, float] | None) -> None:
        # Waits while the provider reads slower than the client sends (backpressure),
        # and gives up with the stream if the sender died.
        put = asyncio.ensure_future(self._outbox.put(item))
        try:
            if self._sender is None or self._sender.done():
                return
            await asyncio.wait({put, self._sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the caller is cancelled while it waits (the client left):
            # a put left pending would outlive the stream.
            if not put.done():
                put.cancel()

    async def _on_end_input(self) -> None:
        await self._flush_batch()
        await self._enqueue(None)

    def start(self) -> None:
        # The sender exists before the first push_audio, so no frame can find it missing.
        self._sender = asyncio.get_running_loop().create_task(
            self._send_loop(), name=f"{self.cloud.provider}-send"
        )
        super().start()

    async def _run(self) -> None:
        assert self._ws is not None and self._sender is not None
        try:
            await self._receive_loop()
        finally:
            self._sender.cancel()
            with contextlib.suppress(BaseException):
                await self._sender

    async def _send_loop(self) -> None:
        interval = self.keepalive_interval_s
        while True:
            try:
                async with asyncio.timeout(interval):
                    item = await self._outbox.get()
            except TimeoutError:
                keepalive = self.keepalive_frame()
                if keepalive is not None:
                    await self.send(keepalive)
                continue
            if item is None:
                break
            frame, audio_ms = item
            await self.send(frame)
            if not audio_ms:
                continue
            self._out_ms += audio_ms
            self._heard_at = max(self._heard_at, self._now()) + audio_ms / 1000
            if self.answers_continuously:
                self._unanswered_ms += audio_ms
                if self._unanswered_ms >= self.unanswered_audio_ms and self._answer_due is None:
                    # Due for the audio sent (heard by _heard_at, later than now),
                    # not for what waits behind it.
                    self._answer_due = self._heard_at + self.settings.provider_response_timeout_s
        self._finalizing = True
        for frame in self.finalize_frames():
            await self.send(frame)
        # The finalize must be answered, or the stream ends with what it has.
        self._answer_due = self._heard_by() + self.settings.provider_finalize_timeout_s

    async def _receive_loop(self) -> None:
        assert self._ws is not None and self._sender is not None
        ws = self._ws
        while True:
            if self._sender.done() and not self._sender.cancelled():
                error = self._sender.exception()
                if error is not None:
                    await self._give_up(_as_provider_error(self.cloud.provider, error))
            try:
                async with asyncio.timeout_at(self._deadline()):
                    message = await ws.recv()
            except TimeoutError:
                if self._answer_due is None or self._now() < self._answer_due:
                    continue  # woken to re-check the sender
                what = "the finalize" if self._finalizing else "the audio"
                limit = (
                    self.settings.provider_finalize_timeout_s
                    if self._finalizing
                    else self.settings.provider_response_timeout_s
                )
                await self._give_up(
                    ProviderTimeout(self.cloud.provider, f"no answer to {what} within {limit:g} s")
                )
            except ConnectionClosedOK as exc:
                if self._finalizing and self.close_is_done and self.last_error is None:
                    break  # the provider closed after flushing: done
                # Before its done message the rest of its words are lost: a failure,
                # so the fallback replays the audio since the last final.
                what = (
                    "closed the connection before answering the finalize"
                    if self._finalizing
                    else "closed the connection before the end of the audio"
                )
                await self._give_up(self._close_failure(exc, what))
            except ConnectionClosed as exc:
                await self._give_up(self._close_failure(exc, "connection dropped"))
            else:
                if self.answers_continuously or self._finalizing:
                    self.answered()
                if await self.on_message(message):
                    if not self._finalizing:  # the rest of the audio would be lost unsaid
                        early = "ended the stream before the end of the audio"
                        await self._give_up(self.fail(early))
                    break
                if self._finalizing and self._answer_due is None:
                    # Still flushing: keep the finalize bound.
                    self._answer_due = self._heard_by() + self.settings.provider_finalize_timeout_s
        await self.utterances.flush()
        await self._close_ws()

    def _close_failure(self, exc: ConnectionClosed, what: str) -> ProviderError:
        """The failure for a close; after an error the provider reported, that error."""
        error = self.last_error
        if error is None:
            if isinstance(exc, ConnectionClosedOK):
                return self.fail(what)
            return self.fail(f"{what}: {_describe_close(exc)}")
        return self.fail(
            f"closed the connection ({_describe_close(exc)}) after {error.reason}",
            retryable=error.retryable,
        )

    def _deadline(self) -> float | None:
        deadline = self._answer_due
        if self._sender is not None and not self._sender.done():
            # Wake at least every second to notice a failed sender.
            soon = self._now() + 1.0
            deadline = soon if deadline is None else min(deadline, soon)
        return deadline

    def progress_at(self) -> float:
        # While a provider at real time is still hearing the audio sent ahead of
        # now (a file sent fast), its silence is not a failure yet: the session's
        # drain must not cut it off (a cut-off never falls back) before the
        # stream's own deadlines, which count from then and do fall back.
        return time.monotonic() if self._heard_by() > self._now() else 0.0

    def _heard_by(self) -> float:
        """Loop time by which a provider transcribing at real time can have heard
        all the audio handed over so far: what was sent, then what waits in the
        outbox.  A client sending faster than real time (a file) puts seconds of
        audio ahead of a flush; the provider reaches the flush only that much later.
        """
        queued_ms = max(0.0, self.sent_ms - self._out_ms)
        queued_ms += self.pcm16_ms(len(self._batch))
        return max(self._heard_at, self._now()) + queued_ms / 1000

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()  # the clock of asyncio.timeout_at

    async def _give_up(self, error: ProviderError) -> None:
        """Fail the stream.

        The open utterance is not finalized here: with a fallback the session
        replays its audio to the fallback; without one the session turns the
        last partial into the final, so the words are not lost either way.
        """
        self.log.warning("provider stream failed", extra={"reason": error.reason})
        await self._abandon()
        raise error

    async def _close_ws(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.settings.provider_finalize_timeout_s):
                    await self._ws.close()
            await self._abandon()

    async def _on_close(self) -> None:
        if self._sender is not None:  # aclose() before the main task ran
            self._sender.cancel()
            with contextlib.suppress(BaseException):
                await self._sender
        await self._abandon()


def _describe_close(exc: ConnectionClosed) -> str:
    frame = exc.rcvd
    if frame is None:
        return "no close frame (network or process failure)"
    return f"code {frame.code}" + (f", {frame.reason}" if frame.reason else "")


def _as_provider_error(provider: str, error: BaseException) -> ProviderError:
    if isinstance(error, ProviderError):
        return error
    if isinstance(error, TimeoutError):
        return ProviderTimeout(provider, "the provider stopped reading audio (send timed out)")
    if isinstance(error, ConnectionClosed):
        return ProviderError(provider, f"connection dropped: {_describe_close(error)}")
    return ProviderError(provider, f"send failed: {error!r}")
