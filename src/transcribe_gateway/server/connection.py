"""One WebSocket connection: the session's timers and engine tasks around a sans-I/O Session.

The transport (:class:`Link`, picows in :mod:`~transcribe_gateway.server.ws_transport`)
calls :meth:`Connection.receive` once per message, and the common case,
an audio chunk the engine takes at once (engines with a fast path: the cloud
adapters), is handled right there, with no task or queue hop.  Whatever must
wait (the key store at authentication, opening an engine at configuration, an
engine pushing back on audio, every chunk of an engine without a fast path such
as the embedded ones, whose decoding costs far more than a task) runs in one
work task; messages arriving meanwhile wait in an inbox, in order, and past
``ws_read_ahead`` of them the socket stops being read, so TCP slows the client.

Tasks, all owned here and cancelled when the connection is cleaned up:

* the work task (only while something waits, see above);
* one pump per engine stream: :class:`SpeechEvent` -> protocol events;
* the ending task (``session.close``, idle timeout, shutdown): finalize the
  pending audio, ``session.closed``, close 1000;
* the cleanup task, once the socket is closing.

Frames out are written at once.  A client that stops reading fills the
socket's buffer; then frames wait here, bounded by ``outgoing_queue``: partials
are dropped first, then the client is closed (1008) rather than buffered
without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import Counter

from transcribe_gateway.audio.decode import Samples, decode_audio
from transcribe_gateway.audio.resample import Resampler
from transcribe_gateway.exceptions import ProviderAtCapacity, ProviderError
from transcribe_gateway.logfields import Fields
from transcribe_gateway.protocol import messages as m
from transcribe_gateway.protocol.session import (
    INTERNAL,
    TOO_MANY,
    UNAUTHORIZED,
    AudioReceived,
    Authenticate,
    CloseRequested,
    Configure,
    Event,
    Session,
    State,
)
from transcribe_gateway.providers.base import (
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
)
from transcribe_gateway.providers.registry import ResolutionError
from transcribe_gateway.server import metrics, tokens
from transcribe_gateway.server.auth import bearer_token
from transcribe_gateway.server.limits import Grant, Refusal, SessionLimits
from transcribe_gateway.server.plan import Plan, plan_for, serving_instead
from transcribe_gateway.server.replay import ReplayBuffer
from transcribe_gateway.server.utterances import UtteranceRelay

if TYPE_CHECKING:
    from transcribe_gateway.server.app import Gateway

log = logging.getLogger(__name__)

_PARTIAL_PREFIX: Final = '{"type":"transcription.partial"'
_CLOSE_REASONS: Final = {4001: "unauthorized", 4029: "over_limit", 1008: "policy", 1011: "error"}
SERVICE_RESTART: Final = 1012
_ENDING: Final = {
    "shutdown": "the server is shutting down",
    "idle_timeout": "the session timed out idle",
}
"""What the session_closing errors of a server-side end say (by session.closed reason)."""


class _OneASecond:
    """True at most once a second: the errors of a stream of refused chunks."""

    def __init__(self) -> None:
        self._last = float("-inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last <= 1.0:
            return False
        self._last = now
        return True


def _count_failure(exc: ProviderError) -> None:
    """An engine's failure, or its refusal for want of capacity (a limit, as a quota is)."""
    if isinstance(exc, ProviderAtCapacity):
        metrics.refusals.labels(code="engine_at_capacity").inc()
    else:
        metrics.provider_errors.labels(provider=exc.provider).inc()


def new_session_id() -> str:
    return "ts_" + secrets.token_hex(6)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each is over."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


class Link(Protocol):
    """The socket under a :class:`Connection` (writes never wait)."""

    writable: bool
    """False while the socket's send buffer is full (the client reads slowly)."""

    def send_text(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None:
        """Send the close frame; the socket ends at the client's answer or a timeout."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@dataclass(slots=True)
class _Engine:
    """An open engine stream and where its clock sits in the session's audio."""

    stream: RecognizeStream
    provider: str
    resampler: Resampler
    offset_ms: int
    generation: int
    can_fall_back: bool = False
    """Whether this stream's failure switches the session to its fallback (not once
    it is retired by a reconfiguration: that fallback is the new configuration's)."""
    pump: asyncio.Task[None] | None = None
    last_event_at: float = 0.0
    """Monotonic time of the stream's last progress (for the drain)."""
    input_ended: bool = False
    """Its ``end_input`` was called: the stream may end now."""
    partial_words: tuple[int, int] = (-1, 0)
    """The utterance of the stream's last partial, and the most words a partial of
    it has had: a partial with more is progress, a revision of the same is not."""

    def progressed(self, event: SpeechEvent) -> bool:
        """Whether ``event`` shows the engine getting on with its audio."""
        if event.type is not SpeechEventType.PARTIAL:
            return True
        utterance, most = self.partial_words
        words = len(event.text.split())
        if utterance == event.utterance and words <= most:
            return False
        self.partial_words = (event.utterance, words)
        return True


class _StallWatch:
    """While a wait on an engine taking audio (or its end) lasts: past ``limit``
    seconds with no sign of progress the engine has failed, as one that stopped
    answering has. Else the session, its ``session.close`` held behind the wait,
    would hang for as long as the client stays. A timer, not a task: this is the
    path of every chunk an engine pushes back."""

    def __init__(self, engine: _Engine, limit: float) -> None:
        self._engine = engine
        self._limit = limit
        self._started = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._limit, self._check)

    def __exit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _check(self) -> None:
        engine = self._engine
        last = max(self._started, engine.last_event_at, engine.stream.progress_at())
        quiet = time.monotonic() - last
        if quiet < self._limit:
            self._timer = asyncio.get_running_loop().call_later(self._limit - quiet, self._check)
            return
        reason = f"took no audio and showed no progress for {self._limit:g} s"
        engine.stream.stop_with_error(ProviderError(engine.provider, reason))


class Connection:
    """Serve one client from upgrade to close.

    Args:
        link: the socket.
        gateway: what all connections share.
        authorization: the upgrade request's ``Authorization`` header, if any.
    """

    def __init__(self, link: Link, gateway: Gateway, *, authorization: str | None) -> None:
        self.link = link
        self.gateway = gateway
        self.settings = gateway.settings
        self.session = Session(
            new_session_id(),
            authenticated=False,
            max_chunk_bytes=self.settings.max_chunk_bytes,
            max_message_bytes=self.settings.max_message_bytes,
        )
        self._authorization = authorization
        self.key_id: str | None = None
        self.grant: Grant | None = None
        """The accepted key and its limits (set by authentication)."""
        self._limits: SessionLimits | None = None
        self._rated = False
        """Whether the key has a message rate to count messages against."""
        self._quota = False
        """Whether the key has an audio quota to count audio against."""
        self.end_reason = ""
        """Why the session ended (metrics, usage); empty while it runs."""
        self._latency = metrics.LatencyTracker()
        self.config: m.SessionConfig | None = None
        self.effective: m.EffectiveConfig | None = None
        self._audio_counter: tuple[str, Counter] | None = None
        """The audio counter's child for the provider now serving (labels() is not free)."""
        self._unmetered_s = 0.0
        """Audio not yet added to that counter (it is fed once a second, not per chunk)."""
        self._replaying_to: str | None = None
        """The fallback's provider while the replay feeds it: the audio is its."""
        self.audio_seconds = 0.0
        """Seconds of audio an engine was given or will be (usage, quota)."""
        self.timeline_s = 0.0
        """Seconds of audio received: the session's clock, which event times are
        on. Audio dropped while no engine serves is on it, not in the usage."""
        self._engine: _Engine | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._fallback: Plan | None = None
        self._replay: ReplayBuffer | None = None
        """Audio since the last final, kept while a fallback is configured."""
        self._switching_from: _Engine | None = None
        """The failed engine whose pump is switching the session to its fallback."""
        self._samples_received = 0
        """The session's audio so far, in samples at the configured rate (replay)."""
        self._work: asyncio.Task[None] | None = None
        """The task running whatever must wait; messages meanwhile go to the inbox."""
        self._inbox: collections.deque[str | bytes] = collections.deque()
        self._reading_paused = False
        self._backlog: collections.deque[str] = collections.deque()
        """Frames held while the client reads slowly (bounded by ``outgoing_queue``)."""
        self._close_sent = False
        self._ending: asyncio.Task[None] | None = None
        self._cleanup_task: asyncio.Task[None] | None = None
        self._last_activity = time.monotonic()
        self._pushing = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._no_engine_error_due = _OneASecond()
        """Whether audio no engine takes gets its error now: one a second, not one a chunk."""
        # A client streaming in real time through the drain: one error a second too.
        self.session.closing_gate = _OneASecond()
        self._log = Fields(log, {"session_id": self.session.id})
        self._relay = UtteranceRelay(self.session.send_event, self._log)
        self.closed = asyncio.Event()
        """Set when the connection is over and its resources are freed."""

    @property
    def id(self) -> str:
        return self.session.id

    # ------------------------------------------------------------- lifecycle

    def opened(self) -> None:
        """The WebSocket is open: authenticate by header, or wait for the auth message."""
        self.gateway.connections.add(self)
        if self.gateway.draining:
            self.session.fail(SERVICE_RESTART, "server shutting down")
        elif self._authorization is not None:
            token = bearer_token(self._authorization) or ""
            self._start_work(functools.partial(self._authenticate, token), [])
        else:
            loop = asyncio.get_running_loop()
            self._auth_timer = loop.call_later(self.settings.auth_timeout_s, self._auth_timeout)
        self._flush()

    def _auth_timeout(self) -> None:
        if self.session.state is State.AWAITING_AUTH:
            self._log.info("auth timeout")
            self.session.fail(UNAUTHORIZED, "Unauthorized")
            self._flush()

    def disconnected(self) -> None:
        """The socket is closed (the client left, or the close handshake ended)."""
        if not self._close_sent:
            self._log.info("client disconnected")
        # Nothing to finish for a client that is gone: free everything now.
        self._start_cleanup()

    def abandon(self) -> None:
        """The server exits: free everything and record the usage, whatever the socket's state."""
        self._start_cleanup()

    def _start_cleanup(self) -> None:
        if self._cleanup_task is None:
            self._cleanup_task = asyncio.create_task(self._cleanup(), name=f"{self.id}-cleanup")

    async def _cleanup(self) -> None:
        try:
            for timer in (self._idle_timer, self._auth_timer):
                if timer is not None:
                    timer.cancel()
            if (failed := self._switching_from) is not None and failed.pump is not None:
                # First: a switch that ends now would otherwise hand the session
                # a fallback stream after the engine was retired below.
                await _cancel([failed.pump])
            # The session's own tasks stop first: an update still opening an engine
            # would otherwise install it after the engine below was retired, and
            # nothing would close it (a cancelled update closes what it opened).
            await _cancel([t for t in (self._ending, self._work) if t is not None])
            if self._engine is not None:
                await self._retire(self._engine, finalize=False)
                self._engine = None
            await _cancel(list(self._retired))
            self._inbox.clear()
            await self._release()
        finally:
            # Last, so that a session no longer counted (/healthz, drain) holds
            # no engine stream, task or slot any more.
            self.gateway.connections.discard(self)
            self.closed.set()
        self._log.info(
            "session ended",
            extra={"audio_seconds": round(self.audio_seconds, 3), "key": self.key_id},
        )

    def _internal_error(self) -> None:
        self._log.exception("connection failed")
        self.session.fail(INTERNAL, "internal error")
        self._flush()

    # ----------------------------------------------------------------- input

    def receive(self, message: str | bytes) -> None:
        """One message from the client, text or binary (called by the link, never waits).

        Binary messages are not part of the protocol; the session answers them
        with an error.
        """
        if self._work is not None:
            self._hold(message)
            return
        if self._rated and not self._admit_message():
            # Over the key's message rate: it waits for the next second, and so
            # do the messages after it (backpressure; nothing is dropped).
            self._hold(message)
            self._start_work(self._next_second, [])
            return
        try:
            self._dispatch(self._parse(message))
        except Exception:
            self._internal_error()

    def _hold(self, message: str | bytes) -> None:
        """Keep a message for the work task; past ``ws_read_ahead`` stop reading."""
        self._inbox.append(message)
        if not self._reading_paused and len(self._inbox) >= self.settings.ws_read_ahead:
            self._reading_paused = True
            self.link.pause_reading()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        self.link.resume_reading()

    def _parse(self, message: str | bytes) -> list[Event]:
        if isinstance(message, str):
            self.session.receive_text(message)
        else:
            self.session.receive_bytes(message)
        return self.session.events_received()

    def _dispatch(self, events: list[Event]) -> None:
        """Act on a message's events; hand the rest to a work task at the first wait."""
        for index, event in enumerate(events):
            if isinstance(event, AudioReceived):
                todo = self._accept_audio(event.data)
                if todo is None or self._push_now(*todo):
                    continue
                self._start_work(functools.partial(self._push, *todo), events[index + 1 :])
                break
            if isinstance(event, CloseRequested):
                self.begin_end("client_close")
                continue
            self._start_work(functools.partial(self._handle, event), events[index + 1 :])
            break
        self._flush()

    def _start_work(self, first: Callable[[], Awaitable[None]], then: list[Event]) -> None:
        # A callable, not a coroutine: a task cancelled before it starts would
        # leave a coroutine never awaited.
        self._work = asyncio.create_task(self._run_work(first, then), name=f"{self.id}-work")

    async def _run_work(self, first: Callable[[], Awaitable[None]], then: list[Event]) -> None:
        """Finish what waits, then the messages held meanwhile, in order."""
        try:
            await first()
            self._flush()
            for event in then:
                await self._handle(event)
            while self._inbox and self.session.close_code is None:
                if self._reading_paused and len(self._inbox) <= self.settings.ws_read_ahead // 2:
                    self._resume_reading()
                if self._rated:
                    if not self._admit_message():
                        await self._next_second()
                        continue
                    # The key's other sessions woke at the same second: take turns
                    # with them, or the first would take the whole rate each second.
                    await asyncio.sleep(0)
                events = self._parse(self._inbox.popleft())
                for event in events:
                    await self._handle(event)
                if not events:
                    # Refused as it was read (bad JSON, too big): its error or close
                    # goes now, not with a later message that may never come.
                    self._flush()
        except Exception:
            self._internal_error()
        finally:
            # No await since the inbox was last seen empty (or the session closed):
            # no message can have slipped in behind it.
            self._work = None
            if self._reading_paused:
                self._resume_reading()

    async def _handle(self, event: Event) -> None:
        """One event, waiting as long as it needs; its answers are written at once."""
        if isinstance(event, AudioReceived):
            todo = self._accept_audio(event.data)
            if todo is not None and not self._push_now(*todo):
                await self._push(*todo)
        elif isinstance(event, Configure):
            await self._configure(event.config)
        elif isinstance(event, Authenticate):
            await self._authenticate(event.token)
        else:
            self.begin_end("client_close")
        self._flush()

    # ------------------------------------------------------------------- auth

    async def _authenticate(self, token: str) -> None:
        try:
            if tokens.looks_like_token(token):  # a short-lived session token (browsers)
                gw = self.gateway
                outcome = await tokens.admit(gw.tokens, gw.admission, token, self.id)
            else:
                outcome = await self.gateway.admission.authenticate(token, self.id)
        except Exception:  # store unreachable: refuse rather than let anyone in
            self._log.warning("key check failed", exc_info=True)
            outcome = Refusal("unavailable", "the key store did not answer; retry later", INTERNAL)
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self.session.state is not State.AWAITING_AUTH:  # closed meanwhile (shutdown)
            if isinstance(outcome, Grant):
                await self.gateway.store.release_slot(outcome.key_id, self.id)
            return
        if isinstance(outcome, Refusal):
            # Never log the presented key, not even a fingerprint of a wrong one.
            self._log.info("refused", extra={"reason": outcome.code or "unauthorized"})
            # Counted under its code, as a session the quota ends mid-stream is (a
            # close code alone reads "over_limit" for a quota and a session limit).
            self.end_reason = outcome.code
            if not outcome.code:
                self.session.reject_auth()
            elif outcome.code == "too_many_sessions":
                self.session.reject_over_quota(outcome.message)
            else:
                self.session.send_error(
                    outcome.code, outcome.message, retryable=outcome.code == "unavailable"
                )
                reason = {UNAUTHORIZED: "Unauthorized", INTERNAL: "internal error"}
                self.session.fail(outcome.close_code, reason.get(outcome.close_code, "Over quota"))
            return
        self.grant, self.key_id = outcome, outcome.key_id
        self._limits = SessionLimits(outcome)
        self._rated = bool(outcome.limits.messages_per_second)
        self._quota = bool(outcome.period_id)
        metrics.active_sessions.inc()
        self.session.accept_auth()
        self._touch()
        self._log.info("session created", extra={"key": self.key_id})

    def terminate(self, code: int, error_code: str, message: str) -> None:
        """End now for a key-level reason (revoked, over quota): ``error``, then close ``code``.

        Pending audio is not finalized: the key may no longer be served.
        """
        if self.session.state is State.CLOSED:
            return
        self._log.info("session terminated", extra={"reason": error_code})
        if code == TOO_MANY:  # a limit ended it (quota): a refusal, as one at auth is
            metrics.refusals.labels(code=error_code).inc()
        self.end_reason = error_code
        if self.session.state in (State.STREAMING, State.DRAINING):
            # Not finalized (the key may not pay for it), but none is left open.
            self._relay.close_all(round(self.timeline_s * 1000), finals=False)
        self.session.send_error(error_code, message)
        self.session.fail(code, "Unauthorized" if code == UNAUTHORIZED else "Over quota")
        self._flush()

    def _admit_message(self) -> bool:
        """Count a client message against its key's rate; False when it must wait."""
        if self.session.state is State.DRAINING:
            # Only refused now (session_closing): held at the rate, they held back
            # session.closed, which waits for the messages before it.
            return True
        assert self._limits is not None
        return self.gateway.admission.check_message(self._limits)

    async def _next_second(self) -> None:
        """Wait for the key's next rate window (rates count calendar seconds)."""
        metrics.rate_waits.inc()
        await asyncio.sleep(1.0 - time.time() % 1.0)

    def _meter(self, seconds: float) -> None:
        """Count audio an engine is to be given (usage, metrics, the key's audio quota).

        Audio that would take the key over its quota ends the session instead
        (the caller checks ``session.close_code``): it is not given to the
        engine, and only what fits in the quota is counted, so that the key is
        used up (its next session is refused at once).
        """
        fits = seconds
        if self._quota and self._limits is not None:
            fits = self._limits.add_audio(seconds)
        self.audio_seconds += fits
        self._unmetered_s += fits
        if fits < seconds and self._limits is not None:  # the rest: over the quota
            grant = self._limits.grant
            self.terminate(
                4029,
                "quota_exceeded",
                f"this key used its {grant.limits.audio_minutes:g} audio minutes "
                f"for {grant.period_id}",
            )
        elif self._unmetered_s >= 1.0:
            self._count_audio()

    def _over_quota_with(self, seconds: float) -> bool:
        """Whether ``seconds`` more audio would take the key over its quota."""
        return self._quota and self._limits is not None and self._limits.fits(seconds) < seconds

    def _count_audio(self) -> None:
        """Add the audio received since the last call to the provider's counter."""
        provider = self._replaying_to or (self.effective.provider if self.effective else None)
        if provider is None:
            return
        if self._audio_counter is None or self._audio_counter[0] != provider:
            self._audio_counter = (provider, metrics.audio_seconds.labels(provider=provider))
        self._audio_counter[1].inc(self._unmetered_s)
        self._unmetered_s = 0.0

    async def _release(self) -> None:
        """Count the ended session, free its slot and write its usage record."""
        self._count_audio()
        code = self.session.close_code
        reason = self.end_reason or (
            _CLOSE_REASONS.get(code, f"close_{code}") if code else "client_disconnected"
        )
        metrics.sessions.labels(reason=reason).inc()
        if self.grant is None:
            return
        metrics.active_sessions.dec()
        effective = self.effective
        try:
            await self.gateway.admission.end(
                self.grant,
                self.id,
                effective.provider if effective else "",
                effective.model if effective else "",
                reason,
                self.audio_seconds,
            )
        except Exception:
            self._log.warning("usage not recorded", exc_info=True)

    # ------------------------------------------------------------- configure

    async def _configure(self, config: m.SessionConfig) -> None:
        self._touch()  # even a refused update: a client retrying its config is not idle
        registry = self.gateway.registry
        try:
            resolution = registry.resolve(config.provider, config.model, config.language)
            fallback = None
            if config.fallback is not None:
                fb = config.fallback
                try:
                    fallback = registry.resolve(fb.provider, fb.model, config.language)
                except ResolutionError as exc:
                    if exc.field in ("session.provider", "session.model"):
                        exc.field = exc.field.replace("session.", "session.fallback.")
                    elif exc.field == "session.language":  # the primary has it
                        exc.field, exc.message = "session.fallback.model", f"fallback {exc.message}"
                    raise
        except ResolutionError as exc:
            self.session.send_error(exc.code, exc.message, field=exc.field)
            return
        # A switch to the fallback finishes first (its replay is the audio sent
        # before this update); the update then replaces the fallback.
        await self._switch_done()
        # So do engines an earlier update replaced (each bounded by its drain): a
        # client repeating session.update would otherwise hold any number of
        # streams at once, past its key's session limit. Before the new engine
        # opens: a cloud provider may close a connection that gets no audio.
        if self._retired:
            await asyncio.wait(list(self._retired))
        endpointing_ms = self.settings.endpointing_ms
        plan = plan_for(config, resolution, endpointing_ms=endpointing_ms, session_id=self.id)
        fallback_plan = (
            plan_for(config, fallback, endpointing_ms=endpointing_ms, session_id=self.id)
            if fallback is not None
            else None
        )
        failed: ProviderError | None = None  # the primary's, when the fallback serves
        try:
            stream = await resolution.stt.open_stream(plan.options)
        except ProviderError as exc:
            if fallback_plan is None:
                self._provider_failed(exc)
                self._quiet_not_configured()
                return
            self._report_failure(exc, fallback_plan)
            plan, fallback_plan = serving_instead(fallback_plan, exc, config), None
            try:
                stream = await plan.resolution.stt.open_stream(plan.options)
            except ProviderError as exc2:
                self._provider_failed(exc2)
                self._quiet_not_configured()
                return
            failed = exc
        try:
            serve = await self._make_way()
        except BaseException:  # cancelled (the client left) before the session took it
            await stream.aclose()
            raise
        if not serve:
            await stream.aclose()
            self.session.refuse_update()
            return
        if failed is not None:
            _count_fallback(failed, plan)
        self.config = config
        self._fallback = fallback_plan
        # The replay's sample positions are at this configuration's rate, which
        # may not be the last one's: the session's clock, counted anew in them.
        self._samples_received = round(self.timeline_s * config.sample_rate)
        self._replay = None
        if fallback_plan is not None:
            buffer_s = self.settings.fallback_buffer_s
            self._replay = ReplayBuffer(config.sample_rate, buffer_s, self._samples_received)
        self._engine = self._start_engine(plan, stream, can_fall_back=fallback_plan is not None)
        self._count_audio()  # what came before goes to the provider that had it
        self.effective = plan.effective
        self.session.accept_config(plan.effective)
        self._touch()
        self._log.info(
            "session configured",
            extra={"provider": plan.effective.provider, "model": plan.effective.model},
        )

    async def _make_way(self) -> bool:
        """Make way for a new engine: a switch to the fallback that began while it
        opened finishes first, and a reconfigured session's engine finishes in the
        background. False when the session began to end meanwhile."""
        await self._switch_done()
        if self._ending_meanwhile():
            return False
        if self._engine is not None:
            await self._retire(self._engine, finalize=True)
        return not self._ending_meanwhile()

    def _ending_meanwhile(self) -> bool:
        """The session began to end (shutdown, idle, quota) while its update waited
        for an engine: too late to serve it; what is ending drains the old one."""
        return self.session.state not in (State.AWAITING_CONFIG, State.STREAMING)

    def _provider_failed(self, exc: ProviderError) -> None:
        """An engine failed and nothing takes over: counted, and the client told."""
        _count_failure(exc)
        self.session.send_error(exc.code, str(exc), retryable=exc.retryable)

    def _quiet_not_configured(self) -> None:
        """After a first configuration's engine failed to open, its audio (sent
        meanwhile, often hundreds of chunks) gets one error a second, as after a
        failure mid-stream: the ``provider_error`` said why."""
        self.session.not_configured_gate = self._no_engine_error_due

    def _report_failure(self, exc: ProviderError, fallback: Plan, *, lost_ms: int = 0) -> None:
        """An engine failed and ``fallback`` takes over: counted, and the client told
        (also of the audio ``lost_ms`` that the fallback cannot be given)."""
        _count_failure(exc)
        self._log.warning(
            "provider failed; switching to fallback",
            extra={"reason": exc.reason, "fallback": fallback.effective.provider},
        )
        lost = (
            f"; the first {lost_ms / 1000:g} s of audio since the last final were over "
            f"fallback_buffer_s ({self.settings.fallback_buffer_s:g} s) and are not replayed"
            if lost_ms
            else ""
        )
        self.session.send_error(
            "provider_error",
            f"{exc}; switching to the fallback "
            f"{fallback.effective.provider}/{fallback.effective.model}{lost}",
            retryable=exc.retryable,
        )
        self._flush()

    def _start_engine(self, plan: Plan, stream: RecognizeStream, *, can_fall_back: bool) -> _Engine:
        assert self.config is not None
        self._generation += 1
        engine = _Engine(
            stream,
            plan.effective.provider,
            Resampler(self.config.sample_rate, plan.options.sample_rate),
            offset_ms=round(self.timeline_s * 1000),
            generation=self._generation,
            can_fall_back=can_fall_back,
        )
        engine.pump = asyncio.create_task(self._pump(engine), name=f"{self.id}-pump")
        return engine

    async def _fall_back(self, failed: _Engine, exc: ProviderError) -> bool:
        """Replace a failed engine by the fallback and replay the audio not yet final.

        Runs in the failed engine's pump task, so whoever waits for that pump
        (the ending task) also waits for the switch.  Audio arriving meanwhile
        goes into the replay buffer, which is drained until it is empty before
        the new engine takes the live audio: nothing is skipped or sent twice.
        """
        plan, replay = self._fallback, self._replay
        if plan is None or replay is None or not failed.can_fall_back:
            return False
        if self._cleanup_task is not None:
            return False  # the client is gone: nobody to transcribe for
        self._fallback = None  # one switch per configuration
        self._report_failure(exc, plan, lost_ms=replay.lost_ms)
        if self._engine is failed:
            self._engine = None
        # Whoever ends, frees or reconfigures the session waits for this pump (or
        # cancels it) first: _end, _cleanup, _configure, _drain.
        self._switching_from = failed
        # Audio from here on (while the fallback opens too) is billed as the
        # fallback takes it; what came before was when the failed engine took it.
        switch_sample = self._samples_received
        engine: _Engine | None = None
        try:
            assert self.config is not None
            plan = serving_instead(plan, exc, self.config)
            try:
                stream = await plan.resolution.stt.open_stream(plan.options)
            except Exception as error:
                failure = error if isinstance(error, ProviderError) else None
                if failure is None:  # a bug in the engine: this session's alone
                    self._log.exception("fallback engine failed to open")
                    failure = ProviderError(
                        plan.effective.provider, f"internal engine error: {error!r}"
                    )
                self._close_utterances(failed, finals=True)  # before the error, as in _pump
                self._provider_failed(failure)
                return True
            self._close_utterances(failed, finals=False)  # their audio is replayed
            self._count_audio()  # the failed provider's share, before it is replaced
            # Announced before the replay's first event (a client tags what follows
            # with it); one that fails in the replay then gets its own provider_error.
            self.effective = plan.effective
            self.session.announce_config(plan.effective)
            self._flush()
            engine = self._start_engine(plan, stream, can_fall_back=False)
            engine.offset_ms = replay.start_ms
            limit = self.settings.drain_timeout_s
            self._replaying_to = plan.effective.provider
            refused = False
            for first, chunk in replay.unplayed():  # grows while we wait: caught up at its end
                seconds = len(chunk) / replay.rate if first >= switch_sample else 0.0
                if seconds and self._over_quota_with(seconds):
                    self._meter(seconds)  # ends the session at the quota
                    break
                converted = engine.resampler.push(chunk)
                if len(converted):
                    # A fallback that stops taking audio has failed too (its pump
                    # reports it); unbounded, the session's end waited on it for ever.
                    with _StallWatch(engine, limit):
                        try:
                            await engine.stream.push_audio(converted)
                        except RuntimeError:  # it failed: its pump reports why
                            refused = True
                            break
                if seconds:
                    self._meter(seconds)
            assert engine.pump is not None
            if refused or engine.pump.done():
                # The fallback failed during the replay: its pump reported it, and
                # the audio of the switch it did not take is dropped.
                await asyncio.wait({engine.pump})
                return True
            if self.session.close_code is not None:
                return True  # ended at the quota during the replay: no switch made
            self._engine, engine = engine, None
            _count_fallback(exc, plan)
            return True
        finally:
            self._count_audio()
            self._replaying_to = None
            self._switching_from = None
            self._replay = None
            replay.clear()
            if engine is not None:  # failed or cancelled before it took over
                await self._retire(engine, finalize=False)

    async def _switch_done(self) -> None:
        """Wait for a switch to the fallback under way, if any (bounded by its own
        timeouts: the fallback's open and sends)."""
        if (failed := self._switching_from) is not None and failed.pump is not None:
            await asyncio.wait({failed.pump})

    async def _retire(self, engine: _Engine, *, finalize: bool) -> None:
        """Stop feeding ``engine``; with ``finalize`` let it finish its pending audio."""
        if not finalize:
            if engine.pump is not None:
                await _cancel([engine.pump])
            await engine.stream.aclose()
            # Nothing more comes of it: what it left open is closed (normally nothing).
            self._close_utterances(engine, finals=True)
            return
        engine.can_fall_back = False
        await self._finish_input(engine)
        task = asyncio.create_task(self._drain(engine), name=f"{self.id}-retire")
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _finish_input(self, engine: _Engine) -> None:
        engine.input_ended = True
        stall = _StallWatch(engine, self.settings.drain_timeout_s)
        with stall, contextlib.suppress(RuntimeError, ProviderError):
            tail = engine.resampler.flush()
            if len(tail):
                await engine.stream.push_audio(tail)
            await engine.stream.end_input()

    async def _drain(self, engine: _Engine) -> None:
        """Wait for an engine whose input ended to deliver its last events.

        The bound is on silence, not on the total: each event but a partial
        that adds no words to its utterance (or other sign of progress,
        :meth:`RecognizeStream.progress_at`) restarts the ``drain_timeout_s``
        clock, so a busy engine working through a backlog is given its time
        while one that stopped answering, or only ever revises a partial, is
        cut off.
        """
        started = time.monotonic()
        try:
            while engine.pump is not None and not engine.pump.done():
                if self._switching_from is engine:
                    # Its pump is switching to the fallback, which has timeouts of
                    # its own (open, send) and is drained next (_end): cut off
                    # halfway, the switch would lose the audio it was replaying.
                    await asyncio.wait({engine.pump})
                    continue
                quiet_since = max(started, engine.last_event_at, engine.stream.progress_at())
                remaining = self.settings.drain_timeout_s - (time.monotonic() - quiet_since)
                if remaining <= 0:
                    self._close_utterances(engine, finals=True)  # before the error
                    self.session.send_error(
                        "provider_error",
                        f"{engine.provider}: no answer but partials "
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

    def _accept_audio(self, data: bytes) -> tuple[_Engine, Samples] | None:
        """Count, keep and convert one chunk; returns what the engine should be given."""
        assert self.config is not None, "the session only accepts audio once configured"
        samples = decode_audio(data, self.config.input_audio_format)
        first_sample = self._samples_received
        self._samples_received += len(samples)
        seconds = len(samples) / self.config.sample_rate
        self.timeline_s += seconds
        now = time.monotonic()
        engine = self._engine
        if engine is None and self._switching_from is None:
            # Dropped, and said so: on the session's clock, not in its usage or quota.
            self._touch(now)
            if self._no_engine_error_due():
                # An audio error, not provider_error: the failure was reported
                # once, and a client reconfiguring must not take this, sent for
                # its chunks in flight, for the answer to its session.update.
                self.session.send_error(
                    "session_not_configured",
                    "no engine is serving this session since its provider failed; "
                    "send session.update to continue (audio dropped meanwhile)",
                )
            return None
        if self._replay is not None:
            self._replay.append(first_sample, samples)
        self._latency.on_audio(self.timeline_s, now)
        self._touch(now)
        if engine is None:
            # Switching: the fallback takes this chunk from the replay buffer, and
            # it is billed then (_fall_back), not if the switch fails.
            return None
        self._meter(seconds)
        if self.session.close_code is not None:
            return None  # over the audio quota
        converted = engine.resampler.push(samples)
        if not len(converted):
            return None
        return engine, converted

    @staticmethod
    def _push_now(engine: _Engine, samples: Samples) -> bool:
        """Give the engine a chunk if it takes it without waiting."""
        try:
            return engine.stream.push_audio_nowait(samples)
        except RuntimeError:  # the stream failed meanwhile; its pump reports the error
            return True

    async def _push(self, engine: _Engine, samples: Samples) -> None:
        """Give the engine a chunk it could not take at once (it pushes back)."""
        # While the engine holds us back the client is not idle.
        self._pushing = True
        try:
            # RuntimeError: the stream failed meanwhile; its pump reports the error.
            stall = _StallWatch(engine, self.settings.drain_timeout_s)
            with stall, contextlib.suppress(RuntimeError):
                await engine.stream.push_audio(samples)
        finally:
            self._pushing = False
            self._last_activity = time.monotonic()

    # ------------------------------------------------------------------ events

    async def _pump(self, engine: _Engine) -> None:
        try:
            async for event in engine.stream:
                if engine.progressed(event):
                    engine.last_event_at = time.monotonic()
                self._forward(engine, event)
                self._flush()
            if not engine.input_ended:
                # Its audio would be taken and dropped without a word: a failure,
                # as a cloud provider saying it is done early is (cloud.py).
                raise ProviderError(engine.provider, "ended the stream before the end of the audio")
        except ProviderError as exc:
            # Nothing more comes of it: free what it holds (a LOCAL slot, a socket).
            await engine.stream.aclose()
            if await self._fall_back(engine, exc):
                return
            self._log.warning("provider failed", extra={"reason": exc.reason})
            self._close_utterances(engine, finals=True)
            self._provider_failed(exc)
            if self._engine is engine:
                self._engine = None
            self._flush()

    def _close_utterances(self, engine: _Engine, *, finals: bool) -> None:
        """``engine`` ends without finishing its utterances (it failed, or was cut
        off): each gets its ``speech.stopped`` (with ``finals``, its last partial
        as its final first; :meth:`UtteranceRelay.close`)."""
        streaming = self.session.state in (State.STREAMING, State.DRAINING)
        end_ms = round(self.timeline_s * 1000)
        self._relay.close(engine.generation, end_ms, finals=finals, send=streaming)

    def _forward(self, engine: _Engine, event: SpeechEvent) -> None:
        if self.session.state not in (State.STREAMING, State.DRAINING):
            return
        self._latency.observe(engine.generation, event, engine.offset_ms)
        if self._relay.forward(engine.generation, engine.offset_ms, event):  # a final
            if self._replay is not None and engine is self._engine:
                self._replay.trim_before(event.end_ms + engine.offset_ms)
            if self.settings.log_level == "debug":
                self._log.debug("final", extra={"text": event.text})

    # ----------------------------------------------------------------- ending

    def begin_end(self, reason: str, *, linger_s: float = 0.0) -> None:
        """End gracefully: finalize pending audio, ``session.closed``, close 1000.

        Args:
            reason: reported in ``session.closed``.
            linger_s: keep taking audio this long first, so frames the client
                sent before a server-side end (shutdown) are still transcribed.
        """
        if self._ending is None and self.session.state is not State.CLOSED:
            self.end_reason = self.end_reason or reason
            if not linger_s:
                self.session.start_draining(_ENDING.get(reason, "the session is ending"))
            self._ending = asyncio.create_task(self._end(reason, linger_s), name=f"{self.id}-end")

    async def _end(self, reason: str, linger_s: float = 0.0) -> None:
        if linger_s:
            await asyncio.sleep(linger_s)
            self.session.start_draining(_ENDING.get(reason, "the session is ending"))
        if (work := self._work) is not None:
            # A push the engine held back is audio counted as accepted (usage): it
            # goes in before the input ends. Later messages are refused (closing).
            await asyncio.wait({work}, timeout=self.settings.drain_timeout_s)
        if self.session.state is State.AWAITING_AUTH:
            # Never a session: closed as a connection that came in during the drain.
            if self._auth_timer is not None:
                self._auth_timer.cancel()
            self.session.fail(SERVICE_RESTART, "server shutting down")
            self._flush()
            return
        # A fallback may take over while the failed engine finalizes: finish it too.
        while True:
            await self._switch_done()  # a switch under way: its fallback is next
            if (engine := self._engine) is None:
                break
            self._engine = None
            try:
                await self._finish_input(engine)
            except BaseException:  # cancelled (the client left): nothing else holds it now
                await self._retire(engine, finalize=False)
                raise
            await self._drain(engine)  # retires it, however it ends
        if self._retired:  # earlier streams still finishing after a reconfiguration
            # Each is bounded by its own drain (silence, as the engine above): a
            # total bound cut off one still working, and its words with it.
            await asyncio.wait(list(self._retired))
        if self.session.state is State.CLOSED:
            return
        self.session.send_closed(self.audio_seconds, reason)
        self._log.info("session closing", extra={"reason": reason})
        self._flush()

    def _touch(self, now: float | None = None) -> None:
        self._last_activity = time.monotonic() if now is None else now
        if self._idle_timer is None:
            self._arm_idle(self.settings.idle_timeout_s)

    def _arm_idle(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per idle period, re-armed lazily: no timer churn per chunk.
        idle_for = time.monotonic() - self._last_activity
        remaining = self.settings.idle_timeout_s - idle_for
        if self._pushing or self._inbox:
            # Held back by the engine, or its messages held while the session
            # waits (an update waiting for a replaced engine): not idle.
            remaining = self.settings.idle_timeout_s
        if remaining > 0.01:
            self._arm_idle(remaining)
            return
        self._idle_timer = None
        self._log.info("idle timeout")
        self.begin_end("idle_timeout")

    # ----------------------------------------------------------------- output

    def _flush(self) -> None:
        """Write the session's frames (never waits); close the socket once it is closed."""
        frames = self.session.data_to_send()
        if self._close_sent:
            return
        link = self.link
        for frame in frames:
            if link.writable and not self._backlog:
                link.send_text(frame)
            elif len(self._backlog) < self.settings.outgoing_queue:
                self._backlog.append(frame)
            elif frame.startswith(_PARTIAL_PREFIX):
                continue  # superseded by the next partial anyway
            else:
                self._log.warning("client is not reading; closing")
                self._backlog.clear()
                self.session.fail(1008, "client is not reading")
                break
        if self.session.close_code is not None:
            self._close_sent = True
            # Bounded (outgoing_queue frames): what the client was due, then the close.
            while self._backlog:
                link.send_text(self._backlog.popleft())
            link.close(self.session.close_code, self.session.close_reason)
            self._start_cleanup()

    def resumed_writing(self) -> None:
        """The client reads again: send what was held back."""
        while self._backlog and self.link.writable and not self._close_sent:
            self.link.send_text(self._backlog.popleft())


def _count_fallback(exc: ProviderError, fallback: Plan) -> None:
    """A session switched to its fallback (it opened) after ``exc``."""
    metrics.fallbacks.labels(
        from_provider=exc.provider, to_provider=fallback.effective.provider
    ).inc()
