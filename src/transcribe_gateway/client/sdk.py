"""Async client SDK for the Transcribe WebSocket protocol.

One :class:`TranscribeClient` is one session on one WebSocket::

    async with TranscribeClient.connect(url, api_key) as client:
        await client.configure(provider="LOCAL", model="whisper-tiny.en")
        result = await client.stream_file("speech.wav")
        print(result.transcript)

A background task reads every server frame as soon as it arrives, stamps it
with a monotonic clock (for the latency figures in :class:`Timings`), wakes
whoever waits for it (:meth:`TranscribeClient.configure`, the
``session.created`` wait of :meth:`TranscribeClient.open`) and queues it for
:meth:`TranscribeClient.events`.  Nothing is lost: every server message,
including the ``session.created`` and ``session.updated`` that the SDK waited
for itself, is yielded by :meth:`TranscribeClient.events`, in arrival order.

Frames whose ``type`` this SDK does not know (a newer server), or that fail to
validate, are yielded as :class:`UnknownEvent` (type + raw payload) instead of
raising, and logged at debug level; frames that are not JSON objects with a
string ``type`` are skipped with a warning.

Close codes follow the websockets convention: 1000 and 1001 end
:meth:`TranscribeClient.events` normally; any other code (4001 unauthorized,
4029 over quota, 1008, 1011, 1006 lost connection...) raises
:class:`TranscribeConnectionClosed` (or its subclasses
:class:`TranscribeUnauthorized` / :class:`TranscribeQuotaExceeded`).  When no
close frame came from the server but the client had sent one (its keepalive
gave up, or the server sent a frame the client refused), the code is the one the
client sent, and the exception says so (:attr:`TranscribeConnectionClosed.by_client`).
A session is over only at ``session.closed``: :meth:`TranscribeClient.stream_samples`
raises :class:`TranscribeConnectionClosed` when the socket ends before it, 1000
and 1001 included (:attr:`TranscribeConnectionClosed.before_closed`), with what
the stream collected until then in :attr:`TranscribeConnectionClosed.result`.

Keepalive: the client pings the server every ``ping_interval`` seconds and takes
it for dead when, for ``ping_interval + ping_timeout`` seconds, nothing at all
came from it (no message, no pong, no ping of its own) *and* it read none of the
audio queued for it.  A server that stops reading for a while (backpressure:
its engine cannot keep up with a fast sender) is therefore not dropped while it
works through the backlog, since the ping's answer waits behind that audio;
a frozen or vanished server is, and the connection ends with 1011.

Sending fast (``fast=True``) keeps at most :data:`FAST_AUDIO_AHEAD_S` seconds of
audio beyond what the server has read (the answer to a ping sent after every
second of audio), rather than the whole file in the socket's buffers: a
``session.close`` (or a stop) then reaches the server within seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.protocol import State

from transcribe_gateway.audio.decode import (
    BYTES_PER_SAMPLE,
    Samples,
    encode_alaw,
    encode_mulaw,
)
from transcribe_gateway.audio.files import RAW_SUFFIXES, read_audio
from transcribe_gateway.client.errors import (
    TranscribeClientError,
    TranscribeConnectionClosed,
    TranscribeError,
    TranscribeQuotaExceeded,
    TranscribeUnauthorized,
    _close_of,
)
from transcribe_gateway.client.events import Event, UnknownEvent, _decode_frame, event_to_dict
from transcribe_gateway.client.results import StreamResult, Timings
from transcribe_gateway.protocol.messages import (
    AudioAppend,
    AudioFormat,
    Auth,
    EffectiveConfig,
    Error,
    ErrorInfo,
    FallbackConfig,
    SessionClose,
    SessionClosed,
    SessionCreated,
    SessionUpdated,
    TranscriptionCompleted,
    TranscriptionPartial,
    VadConfig,
    encode,
)

__all__ = [
    "AuthMode",
    "Event",
    "StreamResult",
    "Timings",
    "TranscribeClient",
    "TranscribeClientError",
    "TranscribeConnectionClosed",
    "TranscribeError",
    "TranscribeQuotaExceeded",
    "TranscribeUnauthorized",
    "UnknownEvent",
    "event_to_dict",
]

logger = logging.getLogger(__name__)

AuthMode = Literal["header", "message"]
USER_AGENT: Final = "transcribe-gateway-client/0.1"
NORMAL_CLOSE_CODES: Final = frozenset({1000, 1001})
AUDIO_ERROR_CODES: Final = frozenset({"invalid_audio", "audio_too_large", "session_not_configured"})
"""``error`` codes about audio chunks: never taken as the answer to ``configure``."""

_REFUSAL_CLOSE_CODES: Final = {
    "too_many_sessions": 4029,
    "quota_exceeded": 4029,
    "unauthorized": 4001,
    "forbidden": 4001,
}
"""``error`` codes that refuse a session, and the close code the server sends right after."""
_CLOSE_WAIT_S: Final = 2.0
"""How long to wait for the close the server sends right after its last message."""
_ACLOSE_TIMEOUT_S: Final = 10.0
"""Bound on :meth:`TranscribeClient.aclose`'s closing handshake (then the socket is dropped)."""
PING_INTERVAL_S: Final = 20.0
PING_TIMEOUT_S: Final = 20.0
FAST_AUDIO_AHEAD_S: Final = 5.0
"""Sending fast: the most audio (seconds) sent beyond what the server has read."""
_FAST_PING_EVERY_S: Final = 1.0
"""Sending fast: a ping after this much audio, to learn how far the server has read."""


class _Connection(ClientConnection):
    """A client connection that notes when the server last showed it is alive.

    Signs of life: any bytes received (a message, a pong, a ping of the
    server's), and the socket taking more of the audio queued for the server
    after it had been full (the server read some).  A ping's answer alone is
    not enough: when the server stops reading to slow a fast sender down, the
    ping waits behind the queued audio, and the pong with it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_alive = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.last_alive = time.monotonic()
        super().data_received(data)

    def resume_writing(self) -> None:
        self.last_alive = time.monotonic()
        super().resume_writing()


@dataclass(slots=True)
class _Waiter:
    accepts: Callable[[Event], bool]
    future: asyncio.Future[Event]


class TranscribeClient:
    """One transcription session over one WebSocket.

    Create it with :meth:`connect` (async context manager) or :meth:`open`;
    the constructor takes an already open connection and is mostly internal.

    Args:
        ws: an open ``websockets`` client connection.
        dead_after: seconds without a sign of life from the server (see the
            module docstring) after which the connection is dropped with 1011;
            None never drops it.  Needs a connection opened by :meth:`open`
            (others are not watched).
    """

    def __init__(self, ws: ClientConnection, *, dead_after: float | None = None) -> None:
        self._ws = ws
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._waiters: list[_Waiter] = []
        self._configure_lock = asyncio.Lock()
        self._session_id: str | None = None
        self._config: EffectiveConfig | None = None
        self._close_code: int | None = None
        self._close_reason = ""
        self._close_by_client = False
        self._reader_error: BaseException | None = None
        # The last error that announces a refusal close (quota_exceeded before
        # 4029...): the exception for that close carries it.
        self._refusal_error: ErrorInfo | None = None
        # Timing: cumulative ms of audio sent after each chunk, and when it went out.
        self._sent_end_ms: list[float] = []
        self._sent_at: list[float] = []
        self._sent_ms = 0.0
        self._first_audio_at: float | None = None
        self._timings = Timings()
        self._watchdog: asyncio.Task[None] | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="transcribe-client-reader")
        if dead_after is not None and isinstance(ws, _Connection):
            self._watchdog = asyncio.create_task(
                self._watch(ws, dead_after), name="transcribe-client-keepalive"
            )

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        url: str,
        api_key: str,
        *,
        auth: AuthMode = "header",
        open_timeout: float | None = 10.0,
        ping_interval: float | None = PING_INTERVAL_S,
        ping_timeout: float | None = PING_TIMEOUT_S,
    ) -> TranscribeClient:
        """Connect, authenticate and wait for ``session.created``.

        Prefer :meth:`connect`, which also closes the socket; with :meth:`open`
        call :meth:`aclose` yourself.

        Args:
            url: the WebSocket endpoint, e.g. ``ws://127.0.0.1:8000/ws``.
            api_key: an API key or a short-lived token.
            auth: ``header`` sends ``Authorization: Bearer <key>`` on the
                upgrade; ``message`` sends ``{"type": "auth", "token": ...}``
                as the first frame (what browsers must do).
            open_timeout: seconds for the whole opening (TCP, upgrade,
                ``session.created``); None waits forever.
            ping_interval: seconds between keepalive pings; None sends none
                (and never takes the server for dead).
            ping_timeout: the server is taken for dead (the connection ends
                with 1011) after ``ping_interval + ping_timeout`` seconds
                without a sign of life from it: nothing received, and none of
                the queued audio read (see the module docstring; a server that
                reads slowly is not taken for dead); None never.

        Returns:
            A client whose :attr:`session_id` is set.

        Raises:
            TranscribeUnauthorized: the key was refused (4001, HTTP 401/403,
                or an ``error`` ``forbidden``/``unauthorized``).
            TranscribeQuotaExceeded: over quota (4029, HTTP 429, or an
                ``error`` ``too_many_sessions``/``quota_exceeded``).
            TranscribeConnectionClosed: the server closed before ``session.created``.
            TranscribeError: the server sent another ``error`` before ``session.created``.
            TimeoutError: no ``session.created`` within ``open_timeout``.
            OSError: the server cannot be reached.
            websockets.exceptions.InvalidHandshake: the upgrade failed otherwise.
        """
        if auth not in ("header", "message"):
            raise ValueError(f"auth must be 'header' or 'message', not {auth!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if auth == "header" else None
        async with asyncio.timeout(open_timeout):
            try:
                # websockets' own ping timeout would drop a server that stopped
                # reading (its pong waits behind the queued audio): the client's
                # watchdog judges the server instead.
                ws = await ws_connect(
                    url,
                    additional_headers=headers,
                    user_agent_header=USER_AGENT,
                    open_timeout=None,
                    ping_interval=ping_interval,
                    ping_timeout=None,
                    create_connection=_Connection,
                )
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    raise TranscribeUnauthorized(4001, f"HTTP {status} on upgrade") from exc
                if status == 429:
                    raise TranscribeQuotaExceeded(4029, f"HTTP {status} on upgrade") from exc
                raise
            dead_after = None
            if ping_interval is not None and ping_timeout is not None:
                dead_after = ping_interval + ping_timeout
            client = cls(ws, dead_after=dead_after)
            try:
                if auth == "message":
                    await client._send(encode(Auth(token=api_key)))
                event = await client._wait_for(lambda e: isinstance(e, SessionCreated | Error))
                if isinstance(event, Error):
                    raise await client._refusal(event.error)
            except (asyncio.CancelledError, TimeoutError, KeyboardInterrupt):
                # open_timeout, or Ctrl-C: a closing handshake with a server that
                # does not answer would outlast both, so drop the connection.
                client.abort()
                await client._stopped()
                raise
            except BaseException:
                await client.aclose()
                raise
        return client

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        api_key: str,
        *,
        auth: AuthMode = "header",
        open_timeout: float | None = 10.0,
        ping_interval: float | None = PING_INTERVAL_S,
        ping_timeout: float | None = PING_TIMEOUT_S,
    ) -> AsyncIterator[TranscribeClient]:
        """Open a session for the duration of an ``async with`` block.

        Leaving the block closes the socket (code 1000) without sending
        ``session.close``; for a graceful end call :meth:`close_session` and
        drain :meth:`events` first (as :meth:`stream_samples` does).

        Args:
            url: the WebSocket endpoint, e.g. ``ws://127.0.0.1:8000/ws``.
            api_key: an API key or a short-lived token.
            auth: ``header`` or ``message`` (see :meth:`open`).
            open_timeout: seconds allowed until ``session.created``.
            ping_interval: seconds between keepalive pings (see :meth:`open`).
            ping_timeout: when to take the server for dead (see :meth:`open`).

        Returns:
            An async context manager yielding the connected client.

        Raises:
            TranscribeUnauthorized: the key was refused.
            TranscribeQuotaExceeded: too many sessions for the key, or over quota.
            TranscribeConnectionClosed: the server closed before ``session.created``.
            TranscribeError: the server sent another ``error`` before ``session.created``.
            TimeoutError: no ``session.created`` within ``open_timeout``.
            OSError: the server cannot be reached.
        """
        client = await cls.open(
            url,
            api_key,
            auth=auth,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        try:
            yield client
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        """Close the socket (code 1000) and stop the reader; idempotent.

        The closing handshake is bounded (10 s): a server that does not answer
        (frozen, or not reading) has its connection dropped.
        """
        try:
            async with asyncio.timeout(_ACLOSE_TIMEOUT_S):
                await self._ws.close()
        except TimeoutError:
            self.abort()
        await self._stopped()

    async def _stopped(self) -> None:
        """Wait for the reader to end (the connection is closed or aborted)."""
        await asyncio.wait({self._reader})
        if self._watchdog is not None:
            self._watchdog.cancel()

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake; idempotent.

        For a caller that must not wait (a second Ctrl-C): the reader ends
        with code 1006, or the code the client had already sent.
        """
        self._ws.transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection has ended (bound it with ``asyncio.timeout``)."""
        await asyncio.shield(self._reader)

    # ------------------------------------------------------------ properties

    @property
    def session_id(self) -> str:
        """The session id from ``session.created`` (``ts_<12 hex>``)."""
        if self._session_id is None:  # pragma: no cover - open() guarantees it
            raise RuntimeError("no session.created received yet")
        return self._session_id

    @property
    def config(self) -> EffectiveConfig | None:
        """The effective configuration from the last ``session.updated`` received.

        Also one the server sent on its own: after a switch to the fallback
        mid-stream, ``provider``/``model`` name the fallback.
        """
        return self._config

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code once the connection ended, else None."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        """The close reason once the connection ended (may be empty)."""
        return self._close_reason

    @property
    def audio_seconds_sent(self) -> float:
        """Seconds of audio sent so far in this session."""
        return self._sent_ms / 1000.0

    @property
    def timings(self) -> Timings:
        """A snapshot of the latency figures measured so far."""
        t = self._timings
        return Timings(t.first_partial_s, t.first_final_s, list(t.final_latencies_s))

    # ------------------------------------------------------------ requests

    async def configure(
        self,
        *,
        provider: str = "LOCAL",
        model: str = "whisper-tiny.en",
        language: str = "en",
        prompt: str | None = None,
        input_audio_format: AudioFormat = "pcm16",
        sample_rate: int = 16000,
        endpointing: int | None = None,
        endpointing_unfinished: int | None = None,
        vad: VadConfig | None = None,
        fallback: FallbackConfig | None = None,
    ) -> EffectiveConfig:
        """Send ``session.update`` and wait for ``session.updated``.

        With a ``fallback``, a primary that cannot be opened is answered with
        ``error`` ``provider_error`` (``...; switching to the fallback ...``)
        and then ``session.updated`` for the fallback: that configuration is
        returned (its ``requested_provider``/``requested_model`` name the
        primary); both messages stay queued for :meth:`events`.  Only when the
        fallback fails too does this raise.

        :attr:`config` follows every ``session.updated``, including one the
        server sends on its own when it switches to the fallback mid-stream.

        Options left at None are not sent (the server's defaults apply).
        Messages that arrive meanwhile stay queued for :meth:`events`.  The
        server always answers; to bound the wait (loading a model can take
        seconds) wrap the call in ``asyncio.timeout``.

        Args:
            provider: ``LOCAL``, ``DEEPGRAM``, ``OPENAI``...
            model: the provider's model name.
            language: BCP-47 code or ``multi``.
            prompt: bias text (keyterms or free context, by provider).
            input_audio_format: ``pcm16``, ``mulaw`` or ``alaw`` of the audio
                you will send (:meth:`send_samples` encodes accordingly).
            sample_rate: Hz of the audio you will send.
            endpointing: ms of silence that end an utterance.
            endpointing_unfinished: ms of silence that end an utterance whose
                text does not yet end a sentence (semantic endpointing).
            vad: voice-activity tuning.
            fallback: another provider/model to switch to on failure.

        Returns:
            The effective configuration (also kept in :attr:`config`).

        Raises:
            TranscribeError: the server answered with an ``error`` (any code
                except the audio ones, e.g. ``invalid_session_config`` with
                ``field`` set, or ``provider_error`` without a fallback or from
                the fallback too); the previous configuration stands.
            TranscribeConnectionClosed: the connection ended abnormally meanwhile.
        """
        session: dict[str, Any] = {
            "provider": provider,
            "model": model,
            "language": language,
            "input_audio_format": input_audio_format,
            "sample_rate": sample_rate,
        }
        if prompt is not None:
            session["prompt"] = prompt
        if endpointing is not None:
            session["endpointing"] = endpointing
        if endpointing_unfinished is not None:
            session["endpointing_unfinished"] = endpointing_unfinished
        if vad is not None:
            session["vad"] = msgspec.to_builtins(vad)
        if fallback is not None:
            session["fallback"] = msgspec.to_builtins(fallback)
        frame = msgspec.json.encode({"type": "session.update", "session": session}).decode()

        switching = False  # the primary failed to open: the fallback's answer comes next

        def answers(event: Event) -> bool:
            nonlocal switching
            if isinstance(event, SessionUpdated):
                return True
            if not isinstance(event, Error) or event.error.code in AUDIO_ERROR_CODES:
                return False
            if event.error.code == "provider_error" and fallback is not None and not switching:
                switching = True  # session.updated for the fallback, or its own error, follows
                return False
            return True

        async with self._configure_lock:
            waiter = self._add_waiter(answers)
            try:
                await self._send(frame)
            except BaseException:
                self._drop_waiter(waiter)
                raise
            event = await self._await_waiter(waiter)
        if isinstance(event, Error):
            raise TranscribeError.from_info(event.error)
        assert isinstance(event, SessionUpdated)
        return event.session  # _handle() made it the config

    async def send_audio(self, data: bytes) -> None:
        """Send one ``audio.append`` chunk (already encoded in the session format).

        Args:
            data: raw bytes in the configured ``input_audio_format``.

        Raises:
            ValueError: ``data`` is empty.
            TranscribeConnectionClosed: the connection is closed.
        """
        if not data:
            raise ValueError("an audio chunk cannot be empty")
        await self._send(encode(AudioAppend(audio=data)))  # msgspec writes bytes as base64
        now = time.monotonic()
        audio_format, rate = self._audio_format()
        self._sent_ms += len(data) // BYTES_PER_SAMPLE[audio_format] * 1000.0 / rate
        if self._first_audio_at is None:
            self._first_audio_at = now
        self._sent_end_ms.append(self._sent_ms)
        self._sent_at.append(now)

    async def send_samples(
        self, samples: Samples, *, chunk_ms: int = 20, fast: bool = False
    ) -> None:
        """Encode int16 samples in the session's format and send them in chunks.

        Real-time pacing sends each chunk when a live source would have it
        (at the time of its last sample, on a monotonic clock, so it does not
        drift); ``fast`` sends as fast as the server reads them, at most
        :data:`FAST_AUDIO_AHEAD_S` seconds of audio ahead of it (see the
        module docstring).

        Args:
            samples: mono int16 at the configured ``sample_rate``.
            chunk_ms: duration of one chunk.
            fast: do not pace in real time.

        Raises:
            RuntimeError: :meth:`configure` has not succeeded yet.
            ValueError: samples are not a 1-D int16 array, or bad ``chunk_ms``.
            TranscribeConnectionClosed: the connection closed meanwhile.
        """
        await self._send_samples(samples, chunk_ms=chunk_ms, fast=fast, stop=None)

    async def _send_samples(
        self, samples: Samples, *, chunk_ms: int, fast: bool, stop: asyncio.Event | None
    ) -> None:
        """:meth:`send_samples`, ending early once ``stop`` is set."""
        if self._config is None:
            raise RuntimeError("call configure() before sending samples")
        samples = np.asarray(samples)
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError("samples must be a 1-D int16 array")
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        audio_format, rate = self._audio_format()
        data = _encode_samples(samples, audio_format)
        width = BYTES_PER_SAMPLE[audio_format]
        per_chunk = max(1, rate * chunk_ms // 1000)
        start = time.monotonic()
        window = _AckWindow(self._ws, self._sent_ms) if fast else None
        for first in range(0, len(samples), per_chunk):
            last = min(first + per_chunk, len(samples))
            if window is not None:
                try:
                    if not await window.room(self._sent_ms, stop):
                        return
                except ConnectionClosed as exc:
                    raise self._closed_exception(exc) from exc
            else:
                delay = start + last / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                return
            await self.send_audio(data[first * width : last * width])
            if window is not None:
                await window.sent(self._sent_ms)

    async def close_session(self) -> None:
        """Send ``session.close``: the server finalizes, sends ``session.closed``, closes.

        Raises:
            TranscribeConnectionClosed: the connection is already closed.
        """
        await self._send(encode(SessionClose()))

    # ------------------------------------------------------------ receiving

    async def events(self) -> AsyncIterator[Event]:
        """Yield every server message, in arrival order, until the socket closes.

        Yields:
            Decoded server messages (:data:`Event`), :class:`UnknownEvent` for
            types this SDK does not know.

        Raises:
            TranscribeConnectionClosed: the socket closed with a code other than
                1000/1001 (:class:`TranscribeUnauthorized` for 4001).
        """
        while True:
            item = await self._queue.get()
            if item is None:  # end of stream
                self._queue.put_nowait(None)  # later iterations end too
                self._raise_if_abnormal()
                return
            yield item

    def drain_events(self) -> list[Event]:
        """Take the messages already received but not yet iterated, without waiting.

        Returns:
            The queued messages, in order (empty if none).
        """
        drained: list[Event] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:  # keep the end-of-stream marker for events()
                self._queue.put_nowait(None)
                break
            drained.append(item)
        return drained

    async def stream_samples(
        self,
        samples: Samples,
        *,
        fast: bool = False,
        chunk_ms: int = 20,
        on_event: Callable[[Event], None] | None = None,
        finish_timeout: float | None = 60.0,
        stop: asyncio.Event | None = None,
    ) -> StreamResult:
        """Send audio, then ``session.close``, while collecting events until ``session.closed``.

        Sending and receiving run concurrently; ``on_event`` sees each message
        as it arrives (including earlier ``session.created``/``session.updated``
        still queued).  Sending stops early when the session ends first: at
        ``session.closed``, or at an ``error`` ``session_closing`` (the server
        is ending the session, e.g. on shutdown, and drops any further audio),
        or when ``stop`` is set (then ``session.close`` is sent at once).

        A server that reads slower than the audio is sent holds the rest in
        the socket's buffers (backpressure): ``finish_timeout`` counts from
        when the server has read the ``session.close`` (the answer to a ping
        sent right after it), not from when it was queued.

        Args:
            samples: mono int16 at the configured ``sample_rate``.
            fast: send as fast as possible instead of in real time.
            chunk_ms: chunk duration.
            on_event: called synchronously with each message.
            finish_timeout: seconds allowed, once the server has read
                ``session.close``, for ``session.closed`` (or the close) to
                come; None waits forever.  Without keepalive (``ping_interval``
                or ``ping_timeout`` None) it counts from the ``session.close``.
            stop: when set, stop sending audio and end the session gracefully
                (the finals of the audio sent still come).

        Returns:
            The collected events and timings (with ``session.closed``).

        Raises:
            RuntimeError: :meth:`configure` has not succeeded yet.
            TranscribeConnectionClosed: the socket closed before
                ``session.closed``, whatever the code (1000 and 1001 too: its
                :attr:`~TranscribeConnectionClosed.before_closed` is set), or
                closed abnormally; its :attr:`~TranscribeConnectionClosed.result`
                holds what came before.
            TimeoutError: nothing ended the session within ``finish_timeout``.
        """
        if self._config is None:
            raise RuntimeError("call configure() before streaming")
        samples = np.asarray(samples)
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError("samples must be a 1-D int16 array")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        events: list[Event] = []
        closed: SessionClosed | None = None
        sent_before = self._sent_ms
        refused = asyncio.Event()  # the server takes no more audio, or the caller's stop

        async def relay_stop() -> None:
            if stop is not None:
                await stop.wait()
                refused.set()

        async def produce() -> None:
            relay = asyncio.create_task(relay_stop())
            try:
                await self._send_samples(samples, chunk_ms=chunk_ms, fast=fast, stop=refused)
                await self.close_session()
                await self._server_read_all()
            except TranscribeConnectionClosed:
                logger.debug("connection closed while sending; the receiver reports it")
            finally:
                relay.cancel()

        def sender_error() -> BaseException | None:
            return None if sender.cancelled() else sender.exception()

        sender = asyncio.create_task(produce(), name="transcribe-client-sender")
        armed = True
        try:
            async with asyncio.timeout(None) as deadline:

                def arm(_: asyncio.Task[None]) -> None:
                    # Sending is over: bound the wait for the end, or stop at once
                    # if sending failed (its exception is raised below).
                    if not armed:
                        return
                    if sender_error() is not None:
                        deadline.reschedule(loop.time())
                    elif finish_timeout is not None:
                        deadline.reschedule(loop.time() + finish_timeout)

                sender.add_done_callback(arm)
                async for event in self.events():
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
                    if isinstance(event, Error) and event.error.code == "session_closing":
                        refused.set()
                    if isinstance(event, SessionClosed):
                        closed = event
                        break
                armed = False
        except TimeoutError as exc:
            if sender.done() and (error := sender_error()) is not None:
                raise error from exc
            raise TimeoutError(
                f"no session.closed within {finish_timeout} s of session.close"
            ) from exc
        except TranscribeConnectionClosed as exc:  # the socket ended abnormally
            exc.result = exc.result or self._result(events, None, sent_before, started)
            raise
        finally:
            armed = False
            if not sender.done():
                sender.cancel()
            await asyncio.wait({sender})
        if (error := sender_error()) is not None:
            raise error
        if closed is None:
            # The socket ended (1000 or 1001) before session.closed: the
            # transcript is cut short, which is no success.
            ended = self._ended_exception(before_closed=True)
            if isinstance(ended, TranscribeConnectionClosed):
                ended.result = self._result(events, None, sent_before, started)
            raise ended
        result = self._result(events, closed, sent_before, started)
        # The server closes right after session.closed; record its code.
        await asyncio.wait({self._reader}, timeout=_CLOSE_WAIT_S)
        result.close_code = self._close_code
        return result

    def _result(
        self, events: list[Event], closed: SessionClosed | None, sent_before: float, started: float
    ) -> StreamResult:
        return StreamResult(
            session_id=self.session_id,
            events=events,
            closed=closed,
            close_code=self._close_code,
            audio_seconds=(self._sent_ms - sent_before) / 1000.0,
            wall_seconds=time.monotonic() - started,
            timings=self.timings,
        )

    async def stream_file(
        self,
        path: str | Path,
        *,
        fast: bool = False,
        raw_rate: int | None = None,
        chunk_ms: int = 20,
        on_event: Callable[[Event], None] | None = None,
        finish_timeout: float | None = 60.0,
        stop: asyncio.Event | None = None,
    ) -> StreamResult:
        """Read an audio file at the session's rate and :meth:`stream_samples` it.

        A headerless pcm16 file is taken to be at the session's ``sample_rate``
        (as the CLI's ``--rate`` reads it), unless ``raw_rate`` says otherwise.

        Args:
            path: wav, flac, mp3, ogg, or headerless pcm16 (``.raw``/``.pcm``/``.s16le``).
            fast: send as fast as possible instead of in real time.
            raw_rate: sample rate of a raw pcm16 file (forces raw decoding);
                default: the session's ``sample_rate`` for a ``.raw``/``.pcm``/``.s16le`` file.
            chunk_ms: chunk duration.
            on_event: called synchronously with each message.
            finish_timeout: see :meth:`stream_samples`.
            stop: see :meth:`stream_samples`.

        Returns:
            The collected events and timings.

        Raises:
            RuntimeError: :meth:`configure` has not succeeded yet.
            OSError: the file cannot be opened for reading: missing
                (``FileNotFoundError``), a directory (``IsADirectoryError``), no
                permission (``PermissionError``)...
            ValueError: the file opens but its content cannot be decoded.
            TranscribeConnectionClosed: the socket closed before
                ``session.closed`` (see :meth:`stream_samples`).
        """
        if self._config is None:
            raise RuntimeError("call configure() before streaming")
        rate = self._config.sample_rate
        if raw_rate is None and Path(path).suffix.lower() in RAW_SUFFIXES:
            # No header to say its rate: the session's, as the CLI reads one
            # (read_audio's own 16 kHz sent an 8 kHz file at twice its speed).
            raw_rate = rate
        samples = await asyncio.to_thread(read_audio, path, rate=rate, raw_rate=raw_rate)
        return await self.stream_samples(
            samples,
            fast=fast,
            chunk_ms=chunk_ms,
            on_event=on_event,
            finish_timeout=finish_timeout,
            stop=stop,
        )

    # ------------------------------------------------------------ internals

    async def _server_read_all(self) -> None:
        """Wait until the server has read all that was sent (the answer to a ping).

        Pings are answered in order, after what was sent before them.  Only
        while the keepalive watchdog runs: it ends the wait if the server dies.
        """
        if self._watchdog is None or self._watchdog.done():
            return
        try:
            pong = await self._ws.ping()
            await pong
        except ConnectionClosed:
            pass  # the receiver reports the close

    def _audio_format(self) -> tuple[AudioFormat, int]:
        if self._config is None:
            return "pcm16", 16000
        rate = self._config.sample_rate
        fmt = self._config.input_audio_format
        if fmt == "mulaw":
            return "mulaw", rate
        if fmt == "alaw":
            return "alaw", rate
        return "pcm16", rate

    async def _send(self, frame: str) -> None:
        try:
            await self._ws.send(frame)
        except ConnectionClosed as exc:
            raise self._closed_exception(exc) from exc

    def _closed_exception(self, exc: ConnectionClosed) -> TranscribeConnectionClosed:
        code, reason, by_client = _close_of(exc)
        return TranscribeConnectionClosed.for_code(
            code, reason, error=self._refusal_for(code, by_client), by_client=by_client
        )

    def _refusal_for(self, code: int, by_client: bool) -> ErrorInfo | None:
        """The refusal ``error`` the server sent before closing with ``code``, if any."""
        info = self._refusal_error
        if by_client or info is None or _REFUSAL_CLOSE_CODES.get(info.code) != code:
            return None
        return info

    async def _refusal(self, info: ErrorInfo) -> TranscribeClientError:
        """The exception for an ``error`` received instead of ``session.created``."""
        close_code = _REFUSAL_CLOSE_CODES.get(info.code)
        if close_code is None:
            return TranscribeError.from_info(info)
        # The server closes right after: report its real code and reason when they come.
        await asyncio.wait({self._reader}, timeout=_CLOSE_WAIT_S)
        return TranscribeConnectionClosed.for_code(
            self._close_code or close_code, self._close_reason, error=info
        )

    def _raise_if_abnormal(self) -> None:
        if self._reader_error is not None:
            raise self._reader_error
        code = self._close_code
        if code is not None and code not in NORMAL_CLOSE_CODES:
            raise self._ended_exception()

    def _add_waiter(self, accepts: Callable[[Event], bool]) -> _Waiter:
        waiter = _Waiter(accepts, asyncio.get_running_loop().create_future())
        if self._reader.done():
            waiter.future.set_exception(self._ended_exception())
        else:
            self._waiters.append(waiter)
        return waiter

    async def _await_waiter(self, waiter: _Waiter) -> Event:
        try:
            return await waiter.future
        finally:
            self._drop_waiter(waiter)

    def _drop_waiter(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if waiter.future.done() and not waiter.future.cancelled():
            waiter.future.exception()  # mark retrieved: no "never retrieved" warning
        else:
            waiter.future.cancel()

    async def _wait_for(self, accepts: Callable[[Event], bool]) -> Event:
        return await self._await_waiter(self._add_waiter(accepts))

    def _ended_exception(self, *, before_closed: bool = False) -> BaseException:
        if self._reader_error is not None:
            return self._reader_error
        code, by_client = self._close_code or 1006, self._close_by_client
        return TranscribeConnectionClosed.for_code(
            code,
            self._close_reason,
            error=self._refusal_for(code, by_client),
            by_client=by_client,
            before_closed=before_closed,
        )

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._ws.recv()
                received = time.monotonic()
                event = _decode_frame(frame)
                if event is not None:
                    self._handle(event, received)
        except ConnectionClosed as exc:
            self._close_code, self._close_reason, self._close_by_client = _close_of(exc)
        except Exception as exc:  # pragma: no cover - defensive: never lose the end
            logger.exception("transcribe client reader failed")
            self._reader_error = exc
            self._close_code = self._ws.close_code
            await self._ws.close(1011)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._queue.put_nowait(None)  # end of stream for events()
            for waiter in self._waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(self._ended_exception())
            self._waiters.clear()

    async def _watch(self, ws: _Connection, dead_after: float) -> None:
        """Drop the connection once the server showed no sign of life for ``dead_after`` s."""
        while True:  # sleep until the deadline that the last sign of life set
            quiet = time.monotonic() - ws.last_alive
            if quiet >= dead_after:
                break
            await asyncio.sleep(dead_after - quiet)
        logger.info("no sign of life from the server for %.1f s: dropping it", quiet)
        if ws.protocol.state is State.OPEN:
            # As websockets' own keepalive does (1011), but without waiting for the
            # close frame to get through: a server that reads nothing never gets it.
            ws.protocol.fail(
                CloseCode.INTERNAL_ERROR,
                f"keepalive timeout: no sign of life from the server for {dead_after:g} s",
            )
        ws.transport.abort()

    def _handle(self, event: Event, received: float) -> None:
        if isinstance(event, SessionCreated):
            self._session_id = event.session.id
        elif isinstance(event, SessionUpdated):
            # Every one: configure()'s answer, and the switch to a fallback mid-stream.
            self._config = event.session
        elif isinstance(event, Error) and event.error.code in _REFUSAL_CLOSE_CODES:
            self._refusal_error = event.error
        elif isinstance(event, TranscriptionPartial):
            if self._timings.first_partial_s is None and self._first_audio_at is not None:
                self._timings.first_partial_s = received - self._first_audio_at
        elif isinstance(event, TranscriptionCompleted):
            if self._timings.first_final_s is None and self._first_audio_at is not None:
                self._timings.first_final_s = received - self._first_audio_at
            sent_at = self._sent_time_of(event.end_ms)
            if sent_at is not None:
                self._timings.final_latencies_s.append(received - sent_at)
        for waiter in list(self._waiters):
            if not waiter.future.done() and waiter.accepts(event):
                waiter.future.set_result(event)
                self._waiters.remove(waiter)
        self._queue.put_nowait(event)

    def _sent_time_of(self, audio_ms: float) -> float | None:
        """When the chunk holding the audio up to ``audio_ms`` was sent."""
        if not self._sent_at:
            return None
        index = bisect.bisect_left(self._sent_end_ms, audio_ms - 1e-6)
        return self._sent_at[min(index, len(self._sent_at) - 1)]


class _AckWindow:
    """Fast sending: how much of the audio sent the server has read.

    After every :data:`_FAST_PING_EVERY_S` of audio a ping goes out; its pong
    comes once the server has read all that was sent before it (pings are
    answered in order).  Without this, the whole file waits in the socket's
    buffers, and a ``session.close`` (a Ctrl-C) with it.
    """

    def __init__(self, ws: ClientConnection, sent_ms: float) -> None:
        self._ws = ws
        self._acked_ms = sent_ms  # what the server has surely read
        self._pinged_ms = sent_ms
        self._pending: deque[tuple[float, asyncio.Future[float]]] = deque()

    async def sent(self, sent_ms: float) -> None:
        """Ping when another second of audio went out since the last ping."""
        if sent_ms - self._pinged_ms < _FAST_PING_EVERY_S * 1000:
            return
        try:
            pong = await self._ws.ping()
        except ConnectionClosed:
            return  # the next send (or the receiver) reports the close
        self._pending.append((sent_ms, asyncio.ensure_future(pong)))
        self._pinged_ms = sent_ms

    async def room(self, sent_ms: float, stop: asyncio.Event | None) -> bool:
        """Wait until the server is within :data:`FAST_AUDIO_AHEAD_S` of ``sent_ms``.

        Returns:
            False when ``stop`` was set meanwhile.

        Raises:
            ConnectionClosed: the connection closed meanwhile.
        """
        while self._pending and (
            self._pending[0][1].done() or sent_ms - self._acked_ms >= FAST_AUDIO_AHEAD_S * 1000
        ):
            mark, pong = self._pending[0]
            if not pong.done():
                waits: set[asyncio.Future[Any]] = {pong}
                if stop is not None:
                    waits.add(asyncio.ensure_future(stop.wait()))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits - {pong}:
                        waiting.cancel()
                if not pong.done():
                    return False  # stopped
            pong.result()  # raises ConnectionClosed if the connection closed first
            self._pending.popleft()
            self._acked_ms = mark
        return True


def _encode_samples(samples: Samples, audio_format: AudioFormat) -> bytes:
    if audio_format == "mulaw":
        return encode_mulaw(samples)
    if audio_format == "alaw":
        return encode_alaw(samples)
    return samples.astype("<i2", copy=False).tobytes()
