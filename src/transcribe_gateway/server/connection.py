"""One WebSocket connection: socket, timers and engine tasks around a sans-I/O Session.

Tasks, all owned here and cancelled in :meth:`Connection.run`'s ``finally``:

* the reader (``run`` itself): frames -> :class:`~transcribe_gateway.protocol.session.Session`;
* the writer: a bounded queue of outgoing frames -> socket.  A client that
  stops reading fills it; partials are dropped first, then the client is
  closed (1008) rather than buffered without bound;
* one pump per engine stream: :class:`SpeechEvent` -> protocol events;
* the ending task (``session.close``, idle timeout, shutdown): finalize the
  pending audio, ``session.closed``, close 1000.

Audio is pushed into the engine from the reader, and ``push_audio`` may wait:
a client that sends faster than the engine decodes is slowed down by TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from starlette.websockets import WebSocket

from transcribe_gateway.audio.decode import decode_audio
from transcribe_gateway.audio.resample import Resampler
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.protocol import messages as m
from transcribe_gateway.protocol.session import (
    INTERNAL,
    UNAUTHORIZED,
    AudioReceived,
    Authenticate,
    CloseRequested,
    Configure,
    Session,
    State,
)
from transcribe_gateway.providers.base import (
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)
from transcribe_gateway.providers.registry import ResolutionError
from transcribe_gateway.server.auth import bearer_token, fingerprint

if TYPE_CHECKING:
    from transcribe_gateway.server.app import Gateway

log = logging.getLogger(__name__)

_PARTIAL_PREFIX: Final = '{"type":"transcription.partial"'
_CLOSE: Final = object()
SERVICE_RESTART: Final = 1012


def new_session_id() -> str:
    return "ts_" + secrets.token_hex(6)


@dataclass(slots=True)
class _Engine:
    """An open engine stream and where its clock sits in the session's audio."""

    stream: RecognizeStream
    resampler: Resampler
    offset_ms: int
    generation: int
    pump: asyncio.Task[None] | None = None
    last_event_at: float = 0.0
    """Monotonic time of the stream's last event (drain progress)."""


class Connection:
    """Serve one client from upgrade to close."""

    def __init__(self, ws: WebSocket, gateway: Gateway) -> None:
        self.ws = ws
        self.gateway = gateway
        self.settings = gateway.settings
        self.session = Session(
            new_session_id(),
            authenticated=False,
            max_chunk_bytes=self.settings.max_chunk_bytes,
            max_message_bytes=self.settings.max_message_bytes,
        )
        self.key_id: str | None = None
        self.config: m.SessionConfig | None = None
        self.effective: m.EffectiveConfig | None = None
        self.audio_seconds = 0.0
        """Seconds of audio received (usage)."""
        self._engine: _Engine | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._utterance_ids: dict[tuple[int, int], str] = {}
        self._utterances = 0
        self._out: asyncio.Queue[object] = asyncio.Queue(self.settings.outgoing_queue)
        self._writer: asyncio.Task[None] | None = None
        self._ending: asyncio.Task[None] | None = None
        self._last_activity = time.monotonic()
        self._pushing = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_no_engine_error = 0.0
        self._log = logging.LoggerAdapter(log, {"session_id": self.session.id})
        self.closed = asyncio.Event()
        """Set when the connection is over and its resources are freed."""

    @property
    def id(self) -> str:
        return self.session.id

    # ------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Serve the connection; returns when the socket is closed."""
        await self.ws.accept()
        self._writer = asyncio.create_task(self._write_loop(), name=f"{self.id}-writer")
        self.gateway.connections.add(self)
        try:
            if self.gateway.draining:
                self.session.fail(SERVICE_RESTART, "server shutting down")
            elif "authorization" in self.ws.headers:
                self._authenticate(bearer_token(self.ws.headers["authorization"]) or "")
            self._flush()
            if await self._read_loop():
                await self._wait_writer()
            # else the client is gone: nothing to finish for it, free everything now.
        except Exception:
            self._log.exception("connection failed")
            self.session.fail(INTERNAL, "internal error")
            self._flush()
            await self._wait_writer()
        finally:
            await self._cleanup()

    async def _read_loop(self) -> bool:
        """Read frames until the session closes (True) or the client disconnects (False)."""
        session = self.session
        auth_deadline = time.monotonic() + self.settings.auth_timeout_s
        while session.close_code is None:
            if session.state is State.AWAITING_AUTH:
                try:
                    async with asyncio.timeout(max(0.0, auth_deadline - time.monotonic())):
                        message = await self.ws.receive()
                except TimeoutError:
                    self._log.info("auth timeout")
                    session.fail(UNAUTHORIZED, "Unauthorized")
                    self._flush()
                    return True
            else:
                message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self._log.info("client disconnected", extra={"code": message.get("code")})
                return False
            text = message.get("text")
            if text is not None:
                session.receive_text(text)
            else:
                session.receive_bytes(message.get("bytes") or b"")
            for event in session.events_received():
                if isinstance(event, AudioReceived):
                    await self._on_audio(event.data)
                elif isinstance(event, Configure):
                    await self._configure(event.config)
                elif isinstance(event, Authenticate):
                    self._authenticate(event.token)
                elif isinstance(event, CloseRequested):
                    self.begin_end("client_close")
            self._flush()
        return True

    async def _wait_writer(self) -> None:
        """Let the writer send what is queued (the close is queued last) and close."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), 5.0)

    async def _cleanup(self) -> None:
        self.gateway.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        tasks = [t for t in (self._ending, self._writer) if t is not None and not t.done()]
        if self._engine is not None:
            await self._retire(self._engine, finalize=False)
            self._engine = None
        tasks += [t for t in self._retired if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.closed.set()
        self._log.info(
            "session ended",
            extra={"audio_seconds": round(self.audio_seconds, 3), "key": self.key_id},
        )

    # ------------------------------------------------------------------- auth

    def _authenticate(self, token: str) -> None:
        if self.gateway.keys.verify(token):
            key_id = fingerprint(token)
            limit = self.settings.max_sessions_per_key
            if limit and sum(c.key_id == key_id for c in self.gateway.connections) >= limit:
                self.session.reject_over_quota(
                    f"this key already has {limit} open sessions (max_sessions_per_key)"
                )
                return
            self.key_id = key_id
            self.session.accept_auth()
            self._touch()
            self._log.info("session created", extra={"key": self.key_id})
        else:
            # Never log the presented key, not even a fingerprint of a wrong one.
            self._log.info("unauthorized")
            self.session.reject_auth()

    # ------------------------------------------------------------- configure

    async def _configure(self, config: m.SessionConfig) -> None:
        registry = self.gateway.registry
        try:
            resolution = registry.resolve(config.provider, config.model, config.language)
            if config.fallback is not None:
                fb = config.fallback
                registry.resolve(fb.provider, fb.model, config.language)
        except ResolutionError as exc:
            self.session.send_error(exc.code, exc.message, field=exc.field)
            return
        model = resolution.model
        unsupported: list[str] = []
        language = config.language
        if model.languages is not None and language.split("-")[0] not in model.languages:
            unsupported.append(
                f"language={language} ({model.name} transcribes {model.languages[0]})"
            )
            language = model.languages[0]
        if config.prompt and not model.supports_prompt:
            unsupported.append("prompt")
        if config.vad and not model.supports_vad:
            unsupported.append("vad")
        if config.endpointing is not None and not model.supports_endpointing:
            unsupported.append("endpointing")
        if config.fallback is not None:
            unsupported.append("fallback (provider fallback is not implemented in this build)")
        vad = config.vad or m.VadConfig()
        endpointing = config.endpointing or self.settings.endpointing_ms
        options = StreamOptions(
            model=model.name,
            language=language,
            prompt=config.prompt,
            sample_rate=model.input_rate,
            endpointing_ms=endpointing,
            vad_threshold=vad.threshold if vad.threshold is not None else 0.5,
            vad_prefix_padding_ms=(
                vad.prefix_padding_ms if vad.prefix_padding_ms is not None else 300
            ),
            vad_min_speech_ms=vad.min_speech_ms if vad.min_speech_ms is not None else 100,
        )
        try:
            stream = await resolution.stt.open_stream(options)
        except ProviderError as exc:
            self.session.send_error(exc.code, str(exc), retryable=exc.retryable)
            return
        if self._engine is not None:  # reconfiguration: finish the old stream in the background
            await self._retire(self._engine, finalize=True)
        self._generation += 1
        engine = _Engine(
            stream,
            Resampler(config.sample_rate, model.input_rate),
            offset_ms=round(self.audio_seconds * 1000),
            generation=self._generation,
        )
        engine.pump = asyncio.create_task(self._pump(engine), name=f"{self.id}-pump")
        self._engine = engine
        self.config = config
        self.effective = m.EffectiveConfig(
            provider=resolution.stt.provider,
            model=model.name,
            language=language,
            input_audio_format=config.input_audio_format,
            sample_rate=config.sample_rate,
            endpointing=endpointing,
            prompt=config.prompt,
            vad=config.vad,
            fallback=config.fallback,
            requested_provider=resolution.requested_provider,
            requested_model=resolution.requested_model,
            notice=resolution.notice,
            unsupported=unsupported,
        )
        self.session.accept_config(self.effective)
        self._touch()
        self._log.info(
            "session configured",
            extra={"provider": self.effective.provider, "model": model.name},
        )

    async def _retire(self, engine: _Engine, *, finalize: bool) -> None:
        """Stop feeding ``engine``; with ``finalize`` let it finish its pending audio."""
        if not finalize:
            if engine.pump is not None:
                engine.pump.cancel()
                with contextlib.suppress(BaseException):
                    await engine.pump
            await engine.stream.aclose()
            return
        await self._finish_input(engine)
        task = asyncio.create_task(self._drain(engine), name=f"{self.id}-retire")
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _finish_input(self, engine: _Engine) -> None:
        with contextlib.suppress(RuntimeError, ProviderError):
            tail = engine.resampler.flush()
            if len(tail):
                await engine.stream.push_audio(tail)
            await engine.stream.end_input()

    async def _drain(self, engine: _Engine) -> None:
        """Wait for an engine whose input ended to deliver its last events.

        The bound is on silence, not on the total: each event restarts the
        ``drain_timeout_s`` clock, so a busy engine working through a backlog
        is given its time while one that stopped answering is cut off.
        """
        started = time.monotonic()
        try:
            while engine.pump is not None and not engine.pump.done():
                quiet_since = max(started, engine.last_event_at)
                remaining = self.settings.drain_timeout_s - (time.monotonic() - quiet_since)
                if remaining <= 0:
                    self.session.send_error(
                        "provider_error",
                        f"{self.effective.provider if self.effective else 'engine'}: no answer "
                        f"for {self.settings.drain_timeout_s:g} s while finalizing; the rest of "
                        "the audio could not be transcribed",
                        retryable=True,
                    )
                    self._flush()
                    break
                await asyncio.wait({engine.pump}, timeout=remaining)
        finally:
            await self._retire(engine, finalize=False)

    # ------------------------------------------------------------------ audio

    async def _on_audio(self, data: bytes) -> None:
        assert self.config is not None, "the session only accepts audio once configured"
        samples = decode_audio(data, self.config.input_audio_format)
        self.audio_seconds += len(samples) / self.config.sample_rate
        self._touch()
        engine = self._engine
        if engine is None:
            now = time.monotonic()
            if now - self._last_no_engine_error > 1.0:  # one error a second, not one a chunk
                self._last_no_engine_error = now
                self.session.send_error(
                    "provider_error",
                    "no engine is serving this session since its provider failed; "
                    "send session.update to continue (audio dropped meanwhile)",
                )
            return
        converted = engine.resampler.push(samples)
        if len(converted):
            # While the engine holds us back (backpressure) the client is not idle.
            self._pushing = True
            try:
                # RuntimeError: the stream failed meanwhile; its pump reports the error.
                with contextlib.suppress(RuntimeError):
                    await engine.stream.push_audio(converted)
            finally:
                self._pushing = False
                self._last_activity = time.monotonic()

    # ------------------------------------------------------------------ events

    async def _pump(self, engine: _Engine) -> None:
        try:
            async for event in engine.stream:
                engine.last_event_at = time.monotonic()
                self._forward(engine, event)
                self._flush()
        except ProviderError as exc:
            self._log.warning("provider failed", extra={"reason": exc.reason})
            self.session.send_error(exc.code, str(exc), retryable=exc.retryable)
            if self._engine is engine:
                self._engine = None
            self._flush()

    def _forward(self, engine: _Engine, event: SpeechEvent) -> None:
        if self.session.state not in (State.STREAMING, State.DRAINING):
            return
        key = (engine.generation, event.utterance)
        utterance_id = self._utterance_ids.get(key)
        if utterance_id is None:
            self._utterances += 1
            utterance_id = self._utterance_ids[key] = f"utt_{self._utterances}"
        offset = engine.offset_ms
        kind = event.type
        if kind is SpeechEventType.PARTIAL:
            self.session.send_event(m.TranscriptionPartial(utterance_id, event.text))
        elif kind is SpeechEventType.FINAL:
            words = [
                m.Word(w.word, w.start_ms + offset, w.end_ms + offset, w.confidence)
                for w in event.words
            ]
            self.session.send_event(
                m.TranscriptionCompleted(
                    utterance_id, event.text, event.start_ms + offset, event.end_ms + offset, words
                )
            )
            if self.settings.log_level == "debug":
                self._log.debug("final", extra={"text": event.text})
        elif kind is SpeechEventType.SPEECH_STARTED:
            self.session.send_event(m.SpeechStarted(utterance_id, event.start_ms + offset))
        else:
            self.session.send_event(m.SpeechStopped(utterance_id, event.end_ms + offset))
            self._utterance_ids.pop(key, None)

    # ----------------------------------------------------------------- ending

    def begin_end(self, reason: str, *, linger_s: float = 0.0) -> None:
        """End gracefully: finalize pending audio, ``session.closed``, close 1000.

        Args:
            reason: reported in ``session.closed``.
            linger_s: keep taking audio this long first, so frames the client
                sent before a server-side end (shutdown) are still transcribed.
        """
        if self._ending is None and self.session.state is not State.CLOSED:
            if not linger_s:
                self.session.start_draining()
            self._ending = asyncio.create_task(self._end(reason, linger_s), name=f"{self.id}-end")

    async def _end(self, reason: str, linger_s: float = 0.0) -> None:
        if linger_s:
            await asyncio.sleep(linger_s)
            self.session.start_draining()
        engine, self._engine = self._engine, None
        if engine is not None:
            await self._finish_input(engine)
            await self._drain(engine)
        if self._retired:  # earlier streams still finishing after a reconfiguration
            await asyncio.wait(list(self._retired), timeout=self.settings.drain_timeout_s)
        if self.session.state is State.CLOSED:
            return
        self.session.send_closed(self.audio_seconds, reason)
        self._log.info("session closing", extra={"reason": reason})
        self._flush()

    def _touch(self) -> None:
        self._last_activity = time.monotonic()
        if self._idle_timer is None:
            self._arm_idle(self.settings.idle_timeout_s)

    def _arm_idle(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per idle period, re-armed lazily: no timer churn per chunk.
        idle_for = time.monotonic() - self._last_activity
        remaining = self.settings.idle_timeout_s - idle_for
        if self._pushing:
            remaining = self.settings.idle_timeout_s
        if remaining > 0.01:
            self._arm_idle(remaining)
            return
        self._idle_timer = None
        self._log.info("idle timeout")
        self.begin_end("idle_timeout")

    # ----------------------------------------------------------------- output

    def _flush(self) -> None:
        """Move frames from the session to the writer queue (never waits)."""
        for frame in self.session.data_to_send():
            try:
                self._out.put_nowait(frame)
            except asyncio.QueueFull:
                if frame.startswith(_PARTIAL_PREFIX):
                    continue  # superseded by the next partial anyway
                self._log.warning("client is not reading; closing")
                self.session.fail(1008, "client is not reading")
                self._abort_writer()
                return
        if self.session.close_code is not None:
            self._out_put_close()

    def _out_put_close(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._out.put_nowait(_CLOSE)
            return
        self._abort_writer()

    def _abort_writer(self) -> None:
        """The queue is full: skip what is queued and close the socket now."""
        if self._writer is not None:
            self._writer.cancel()
        self._writer = asyncio.create_task(self._close_socket(), name=f"{self.id}-abort")

    async def _write_loop(self) -> None:
        send: Callable[[str], Any] = self.ws.send_text
        while True:
            frame = await self._out.get()
            if frame is _CLOSE:
                await self._close_socket()
                return
            assert isinstance(frame, str)
            try:
                await send(frame)
            except Exception:  # the client is gone; the reader notices the disconnect
                return

    async def _close_socket(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.ws.close(self.session.close_code or 1000, self.session.close_reason), 5.0
            )
