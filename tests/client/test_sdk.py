"""The client SDK against a small scripted server on a real socket.

:class:`FakeGateway` speaks just enough of PROTOCOL.md to exercise the SDK: it
checks auth (header or first message), answers ``session.update`` (rejecting
unknown providers with ``invalid_session_config``), decodes every
``audio.append`` and records it, emits one utterance per second of audio
(``speech.started``, partials, ``transcription.completed``, ``speech.stopped``)
and ends with ``session.closed`` + close 1000 on ``session.close``.  It can
also stop reading for a while, as the real server does to slow a fast sender
down (backpressure), or for ever (a frozen server).  It is reused by
``test_cli.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from tests.conftest import SHARED_AUDIO
from transcribe_gateway.audio.decode import encode_mulaw
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.client import (
    TranscribeClient,
    TranscribeConnectionClosed,
    TranscribeError,
    TranscribeQuotaExceeded,
    TranscribeUnauthorized,
    UnknownEvent,
    event_to_dict,
)
from transcribe_gateway.protocol.messages import (
    Error,
    FallbackConfig,
    SessionClosed,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionPartial,
    VadConfig,
)

GOOD_KEY = "good-key"
SESSION_ID = "ts_0123456789ab"


@dataclass
class Recorded:
    """What one connection sent to the fake server."""

    path: str
    authorization: str | None
    frames: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]

    @property
    def updates(self) -> list[dict[str, Any]]:
        return [f["session"] for f in self.frames if f["type"] == "session.update"]


@dataclass
class FakeGateway:
    """A scripted stand-in for the real server (see the module docstring)."""

    url: str = ""
    key: str = GOOD_KEY
    utterance_ms: int = 1000
    partial_every_ms: int = 200
    extra_before_updated: list[dict[str, Any]] = field(default_factory=list)
    abort_after_ms: float | None = None
    abort_code: int = 1011
    ignore_close: bool = False
    stall: bool = False
    """Right after ``session.updated``, stop reading the socket (as the real server
    does when its engine is behind: the audio, and the client's pings behind it,
    wait in the socket's buffers)..."""
    stall_s: float | None = None
    """...for this long (None: for ever, and send nothing: a frozen server)..."""
    stall_partial_every_s: float | None = None
    """...sending a partial this often meanwhile (an engine working through a backlog)."""
    audio_delay_s: float = 0.0
    """Time taken by each audio chunk (a slow engine: the server reads slower than a fast
    sender sends, and the rest waits in the socket's buffers)."""
    on_audio: Callable[[float], None] | None = None
    """Called with the seconds of audio handled so far, after each chunk."""
    sessions: list[Recorded] = field(default_factory=list)

    async def handler(self, ws: ServerConnection) -> None:
        rec = Recorded(ws.request.path if ws.request else "", None)
        if ws.request is not None:
            rec.authorization = ws.request.headers.get("Authorization")
        self.sessions.append(rec)
        try:
            await self._serve(ws, rec)
        except ConnectionClosed:
            pass
        finally:
            rec.finished.set()

    async def recorded(self, index: int = 0) -> Recorded:
        """The frames of one connection, once its handler has read them all."""
        rec = self.sessions[index]
        await asyncio.wait_for(rec.finished.wait(), 5)
        return rec

    async def _serve(self, ws: ServerConnection, rec: Recorded) -> None:
        async def send(message: dict[str, Any]) -> None:
            # The client may close first: keep reading what it had already sent.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps(message))

        token: str | None
        if rec.authorization is not None:
            token = rec.authorization.removeprefix("Bearer ")
        else:
            first = json.loads(await ws.recv())
            rec.frames.append(first)
            token = first.get("token") if first.get("type") == "auth" else None
        if token != self.key:
            await ws.close(4001, "Unauthorized")
            return
        await send({"type": "session.created", "session": {"id": SESSION_ID}})

        config: dict[str, Any] | None = None
        audio_ms = 0.0
        utterance = 0
        utt_start = 0.0
        started = False
        partials = 0
        async for raw in ws:
            msg = json.loads(raw)
            rec.frames.append(msg)
            kind = msg["type"]
            if kind == "session.update":
                for frame in self.extra_before_updated:
                    await send(frame)
                session = msg["session"]
                if session.get("provider") != "LOCAL":
                    await send(
                        {
                            "type": "error",
                            "error": {
                                "code": "invalid_session_config",
                                "message": "unknown provider",
                                "field": "session.provider",
                            },
                        }
                    )
                    continue
                config = {
                    "language": "en",
                    "input_audio_format": "pcm16",
                    "sample_rate": 16000,
                    "endpointing": 500,
                    **session,
                }
                await send({"type": "session.updated", "session": config})
                if self.stall:
                    await self._stall(ws, send)
            elif kind == "audio.append":
                data = base64.b64decode(msg["audio"], validate=True)
                rec.chunks.append(data)
                if config is None:
                    await send(
                        {
                            "type": "error",
                            "error": {"code": "session_not_configured", "message": "no config"},
                        }
                    )
                    continue
                width = 2 if config["input_audio_format"] == "pcm16" else 1
                audio_ms += len(data) / width * 1000 / config["sample_rate"]
                if self.audio_delay_s:
                    await asyncio.sleep(self.audio_delay_s)
                if self.on_audio is not None:
                    self.on_audio(audio_ms / 1000)
                if self.abort_after_ms is not None and audio_ms >= self.abort_after_ms:
                    # Keep reading while closing: unread frames would pause the
                    # transport and stall the closing handshake.
                    closing = asyncio.create_task(ws.close(self.abort_code, "scripted failure"))
                    async for _ in ws:
                        pass
                    await closing
                    return
                uid = f"utt_{utterance}"
                if not started:
                    started = True
                    await send(
                        {
                            "type": "speech.started",
                            "utterance_id": uid,
                            "audio_start_ms": int(utt_start),
                        }
                    )
                while (
                    audio_ms - utt_start >= (partials + 1) * self.partial_every_ms
                    and (partials + 1) * self.partial_every_ms < self.utterance_ms
                ):
                    partials += 1
                    await send(
                        {
                            "type": "transcription.partial",
                            "utterance_id": uid,
                            "text": " ".join(["word"] * partials),
                        }
                    )
                if audio_ms - utt_start >= self.utterance_ms:
                    end = utt_start + self.utterance_ms
                    await self._final(send, uid, utterance, utt_start, end)
                    utterance, utt_start, started, partials = utterance + 1, end, False, 0
            elif kind == "session.close" and not self.ignore_close:
                if started:
                    uid = f"utt_{utterance}"
                    await self._final(send, uid, utterance, utt_start, audio_ms)
                await send(
                    {
                        "type": "session.closed",
                        "session": {"id": SESSION_ID},
                        "usage": {"audio_seconds": round(audio_ms / 1000, 3)},
                        "reason": "client_close",
                    }
                )
                await ws.close(1000)
                return

    async def _stall(self, ws: ServerConnection, send: Any) -> None:
        loop = asyncio.get_running_loop()
        end = None if self.stall_s is None else loop.time() + self.stall_s
        step = self.stall_partial_every_s or 0.1
        ws.transport.pause_reading()
        while ws.state is not State.CLOSED and (end is None or loop.time() < end):
            if self.stall_partial_every_s is not None:
                await send({"type": "transcription.partial", "utterance_id": "u", "text": "..."})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), step)
        if ws.state is not State.CLOSED:
            ws.transport.resume_reading()

    @staticmethod
    async def _final(send: Any, uid: str, n: int, start: float, end: float) -> None:
        await send(
            {
                "type": "transcription.completed",
                "utterance_id": uid,
                "text": f"utterance {n}",
                "start_ms": int(start),
                "end_ms": int(end),
                "words": [
                    {
                        "word": "utterance",
                        "start_ms": int(start),
                        "end_ms": int(end),
                        "confidence": 0.9,
                    }
                ],
            }
        )
        await send({"type": "speech.stopped", "utterance_id": uid, "audio_end_ms": int(end)})


@pytest.fixture
async def fake_gateway() -> AsyncIterator[FakeGateway]:
    gw = FakeGateway()
    async with serve(gw.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        gw.url = f"ws://127.0.0.1:{port}/ws"
        yield gw


def tone(seconds: float, rate: int = 16000) -> np.ndarray[Any, np.dtype[np.int16]]:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)


# ---------------------------------------------------------------- auth


async def test_header_auth(fake_gateway: FakeGateway) -> None:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        assert client.session_id == SESSION_ID
    rec = await fake_gateway.recorded()
    assert rec.path == "/ws"
    assert rec.authorization == f"Bearer {GOOD_KEY}"
    assert rec.frames == []


async def test_message_auth_sends_auth_first(fake_gateway: FakeGateway) -> None:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY, auth="message") as client:
        assert client.session_id == SESSION_ID
        await client.configure()
    rec = await fake_gateway.recorded()
    assert rec.authorization is None
    assert rec.frames[0] == {"type": "auth", "token": GOOD_KEY}
    assert rec.types == ["auth", "session.update"]


@pytest.mark.parametrize("auth", ["header", "message"])
async def test_bad_key_raises_unauthorized(fake_gateway: FakeGateway, auth: Any) -> None:
    with pytest.raises(TranscribeUnauthorized) as caught:
        async with TranscribeClient.connect(fake_gateway.url, "wrong", auth=auth):
            pytest.fail("must not get a session")
    assert caught.value.code == 4001
    assert caught.value.reason == "Unauthorized"
    assert isinstance(caught.value, TranscribeConnectionClosed)
    assert "unauthorized" in str(caught.value)


def test_close_code_mapping() -> None:
    assert isinstance(TranscribeConnectionClosed.for_code(4001), TranscribeUnauthorized)
    assert isinstance(TranscribeConnectionClosed.for_code(4029), TranscribeQuotaExceeded)
    other = TranscribeConnectionClosed.for_code(1011, "boom")
    assert type(other) is TranscribeConnectionClosed
    assert (other.code, other.reason) == (1011, "boom")
    # A server shutting down closes 1012 (the drain ended): named, not "abnormal".
    assert "service restart" in str(TranscribeConnectionClosed.for_code(1012))


# ---------------------------------------------------------------- configure


async def test_configure_sends_fields_and_returns_effective(fake_gateway: FakeGateway) -> None:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        effective = await client.configure(
            model="whisper-base.en",
            prompt="Kubernetes, gRPC",
            input_audio_format="mulaw",
            sample_rate=8000,
            endpointing=300,
            endpointing_unfinished=1200,
            vad=VadConfig(threshold=0.6),
            fallback=FallbackConfig(provider="LOCAL", model="whisper-tiny.en"),
        )
        assert client.config == effective
    assert effective.input_audio_format == "mulaw"
    assert effective.sample_rate == 8000
    assert effective.endpointing == 300
    assert (await fake_gateway.recorded()).updates == [
        {
            "provider": "LOCAL",
            "model": "whisper-base.en",
            "language": "en",
            "input_audio_format": "mulaw",
            "sample_rate": 8000,
            "prompt": "Kubernetes, gRPC",
            "endpointing": 300,
            "endpointing_unfinished": 1200,
            "vad": {"threshold": 0.6},
            "fallback": {"provider": "LOCAL", "model": "whisper-tiny.en"},
        }
    ]


async def test_configure_omits_unset_options(fake_gateway: FakeGateway) -> None:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
    assert (await fake_gateway.recorded()).updates == [
        {
            "provider": "LOCAL",
            "model": "whisper-tiny.en",
            "language": "en",
            "input_audio_format": "pcm16",
            "sample_rate": 16000,
        }
    ]


async def test_configure_error_raises_and_session_goes_on(fake_gateway: FakeGateway) -> None:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        with pytest.raises(TranscribeError) as caught:
            await client.configure(provider="NOPE")
        assert caught.value.code == "invalid_session_config"
        assert caught.value.field == "session.provider"
        assert client.config is None
        effective = await client.configure()
        assert effective.provider == "LOCAL"


async def test_events_during_configure_are_kept_in_order(fake_gateway: FakeGateway) -> None:
    audio_error: dict[str, Any] = {
        "type": "error",
        "error": {"code": "invalid_audio", "message": "odd length"},
    }
    future = {"type": "session.future_thing", "x": 1}
    fake_gateway.extra_before_updated = [audio_error, future]
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        effective = await client.configure()  # the audio error is not its answer
        assert effective.model == "whisper-tiny.en"
        drained = client.drain_events()
        assert client.drain_events() == []
    assert [type(e) for e in drained] == [SessionCreated, Error, UnknownEvent, SessionUpdated]
    unknown = drained[2]
    assert isinstance(unknown, UnknownEvent)
    assert unknown.type == "session.future_thing"
    assert event_to_dict(unknown) == future
    # A server that leaves retryable out means false: the SDK fills it in.
    assert event_to_dict(drained[1]) == {
        "type": "error",
        "error": {**audio_error["error"], "retryable": False},
    }


# ---------------------------------------------------------------- audio and events


async def test_send_audio_is_base64_of_the_bytes(fake_gateway: FakeGateway) -> None:
    payloads = [b"\x01\x02" * 160, b"\xff\xfe" * 7]
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
        for data in payloads:
            await client.send_audio(data)
        with pytest.raises(ValueError):
            await client.send_audio(b"")
        await client.close_session()
        await asyncio.wait_for(client.wait_closed(), 5)
        assert client.close_code == 1000
    rec = await fake_gateway.recorded()
    assert rec.chunks == payloads
    assert rec.types[-1] == "session.close"
    assert all(set(f) == {"type", "audio"} for f in rec.frames if f["type"] == "audio.append")


async def test_send_samples_encodes_mulaw(fake_gateway: FakeGateway) -> None:
    samples = tone(0.5, 8000)
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        with pytest.raises(RuntimeError):
            await client.send_samples(samples)
        await client.configure(input_audio_format="mulaw", sample_rate=8000)
        await client.send_samples(samples, fast=True)
        assert client.audio_seconds_sent == pytest.approx(0.5)
        with pytest.raises(ValueError):
            await client.send_samples(samples.astype(np.float32), fast=True)
    chunks = (await fake_gateway.recorded()).chunks
    assert {len(c) for c in chunks} == {160}  # 20 ms of 8 kHz, one byte per sample
    assert b"".join(chunks) == encode_mulaw(samples)


async def test_event_order_and_normal_end(fake_gateway: FakeGateway) -> None:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
        await client.send_samples(tone(1.0), fast=True)
        await client.close_session()
        seen = [event async for event in client.events()]
        assert [event async for event in client.events()] == []  # ended for good
        assert client.close_code == 1000
    kinds = [type(e) for e in seen]
    assert kinds[:2] == [SessionCreated, SessionUpdated]
    assert kinds[2] is SpeechStarted
    assert kinds[3:7] == [TranscriptionPartial] * 4
    assert kinds[7:] == [TranscriptionCompleted, SpeechStopped, SessionClosed]
    final = seen[7]
    assert isinstance(final, TranscriptionCompleted)
    assert (final.start_ms, final.end_ms, final.text) == (0, 1000, "utterance 0")
    assert final.words[0].confidence == pytest.approx(0.9)
    closed = seen[-1]
    assert isinstance(closed, SessionClosed)
    assert closed.usage.audio_seconds == pytest.approx(1.0)


async def test_abnormal_close_raises_after_delivering_events(fake_gateway: FakeGateway) -> None:
    fake_gateway.abort_after_ms = 300
    seen: list[Any] = []
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
        with pytest.raises(TranscribeConnectionClosed) as caught:
            await client.stream_samples(tone(1.0), fast=True, on_event=seen.append)
        assert client.close_code == 1011
    assert caught.value.code == 1011
    assert not isinstance(caught.value, TranscribeUnauthorized)
    assert "internal server error" in str(caught.value)
    assert [type(e) for e in seen][:3] == [SessionCreated, SessionUpdated, SpeechStarted]
    result = caught.value.result  # what came before the close is kept
    assert result is not None and result.closed is None and result.events == seen


# ---------------------------------------------------------------- streaming


async def _stream(fake_gateway: FakeGateway, *, fast: bool) -> tuple[float, Any]:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
        begin = time.monotonic()
        result = await client.stream_samples(tone(1.0), fast=fast)
        return time.monotonic() - begin, result


async def test_stream_real_time_pacing_and_timings(fake_gateway: FakeGateway) -> None:
    paced, result = await _stream(fake_gateway, fast=False)
    fast, fast_result = await _stream(fake_gateway, fast=True)
    assert 0.9 <= paced < 5
    assert fast < paced / 3
    for res in (result, fast_result):
        assert res.session_id == SESSION_ID
        assert res.closed is not None and res.closed.reason == "client_close"
        assert res.close_code == 1000
        assert res.audio_seconds == pytest.approx(1.0)
        assert res.transcript == "utterance 0"
        assert res.errors == []
        assert isinstance(res.events[-1], SessionClosed)
    recorded = [await fake_gateway.recorded(i) for i in range(2)]
    assert [r.types[-1] for r in recorded] == ["session.close", "session.close"]
    assert all(len(c) == 640 for c in recorded[0].chunks)
    timings = result.timings
    # The first partial comes after 200 ms of audio: ~0.18 s after the first chunk.
    assert timings.first_partial_s is not None and 0.1 < timings.first_partial_s < 0.9
    assert len(timings.final_latencies_s) == 1
    assert 0 <= timings.final_latencies_s[0] < 0.5
    assert timings.median_final_latency_s == timings.max_final_latency_s


async def test_stream_file_reads_at_session_rate(fake_gateway: FakeGateway) -> None:
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure(sample_rate=8000)
        # A 16 kHz raw file, said so: resampled to the session's 8 kHz.
        result = await client.stream_file(SHARED_AUDIO / "goforward.raw", fast=True, raw_rate=16000)
    assert result.audio_seconds == pytest.approx(89160 / 2 / 16000, abs=0.01)
    assert len(result.finals) == 3
    assert {len(c) for c in (await fake_gateway.recorded()).chunks[:-1]} == {320}  # 20 ms at 8 kHz


async def test_stream_file_reads_a_raw_file_at_the_session_rate(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    # A headerless file has no rate of its own: the SDK read it as 16 kHz, so an
    # 8 kHz call on an 8 kHz session went out as half its samples (at twice its
    # speed: 2.8 s of 5.6). The CLI's --rate reads it at the session's rate.
    call = read_audio(SHARED_AUDIO / "goforward.raw", rate=8000)
    path = tmp_path / "call8k.raw"
    call.astype("<i2").tofile(path)
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure(sample_rate=8000)
        result = await client.stream_file(path, fast=True)
    assert result.audio_seconds == pytest.approx(len(call) / 8000)
    sent = b"".join((await fake_gateway.recorded()).chunks)
    assert sent == path.read_bytes()  # every sample, as it is in the file


async def test_a_server_that_stops_reading_is_not_taken_for_dead(
    fake_gateway: FakeGateway,
) -> None:
    # The server stops reading for 2 s (its engine is behind: backpressure), while
    # partials keep coming. The client's pings wait behind the queued audio, so a
    # ping timeout (websockets' default 20 s, here 0.3 s) used to drop the
    # connection with 1011 and report "1006 connection lost"; and finish_timeout
    # counted from when session.close was queued, not from when the server read it.
    fake_gateway.stall = True
    fake_gateway.stall_s = 2.0
    fake_gateway.stall_partial_every_s = 0.1
    async with TranscribeClient.connect(
        fake_gateway.url, GOOD_KEY, ping_interval=0.2, ping_timeout=0.3
    ) as client:
        await client.configure()
        result = await client.stream_samples(tone(3.0), fast=True, finish_timeout=1.0)
    assert result.closed is not None and result.close_code == 1000
    assert result.audio_seconds == pytest.approx(3.0)
    assert [f.text for f in result.finals] == ["utterance 0", "utterance 1", "utterance 2"]
    assert result.wall_seconds > 2.0  # it did wait for the server


async def test_a_frozen_server_is_dropped_with_the_code_the_client_sent(
    fake_gateway: FakeGateway,
) -> None:
    # Reads nothing and sends nothing from then on: no sign of life for
    # ping_interval + ping_timeout, and the client ends the connection (1011),
    # naming the code it sent itself since none came from the server.
    fake_gateway.stall = True
    async with TranscribeClient.connect(
        fake_gateway.url, GOOD_KEY, ping_interval=0.2, ping_timeout=0.3
    ) as client:
        await client.configure()
        begin = time.monotonic()
        with pytest.raises(TranscribeConnectionClosed) as caught:
            async with asyncio.timeout(10):
                await client.stream_samples(tone(3.0), fast=True)
        waited = time.monotonic() - begin
        assert client.close_code == 1011
    assert 0.4 < waited < 3, waited
    assert (caught.value.code, caught.value.by_client) == (1011, True)
    assert caught.value.reason.startswith("keepalive timeout")
    assert "sent by the client" in str(caught.value) and "1006" not in str(caught.value)


async def test_stream_times_out_without_session_closed(fake_gateway: FakeGateway) -> None:
    fake_gateway.ignore_close = True
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
        begin = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no session\.closed"):
            await client.stream_samples(tone(0.2), fast=True, finish_timeout=0.2)
        assert time.monotonic() - begin < 2


@pytest.mark.parametrize("code", [1000, 1001])
async def test_a_stream_cut_before_session_closed_raises(
    fake_gateway: FakeGateway, code: int
) -> None:
    # The server ends the socket mid-stream without session.closed (1001: its
    # heartbeat gave up on a fast sender). Only 1000 after session.closed ends a
    # session normally: the transcript is cut short, and that used to be returned
    # as a success (closed=None).
    fake_gateway.abort_after_ms = 300
    fake_gateway.abort_code = code
    seen: list[Any] = []
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
        with pytest.raises(TranscribeConnectionClosed) as caught:
            await client.stream_samples(tone(1.0), fast=True, on_event=seen.append)
    assert (caught.value.code, caught.value.reason) == (code, "scripted failure")
    assert caught.value.before_closed and not caught.value.by_client
    assert "before session.closed" in str(caught.value)
    assert not any(isinstance(e, SessionClosed) for e in seen)
    # What came before the cut is kept: every message, and the audio sent.
    result = caught.value.result
    assert result is not None and result.closed is None and result.events == seen
    assert 0.3 <= result.audio_seconds <= 1.0


# ---------------------------------------------------------------- opening


@pytest.fixture
async def frozen_url() -> AsyncIterator[str]:
    """A server that completes the upgrade, then neither sends nor reads anything."""
    thaw = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        ws.transport.pause_reading()  # the client's close frame is never read
        await thaw.wait()
        ws.transport.resume_reading()  # now see that the client went away
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"
        thaw.set()


async def test_open_timeout_bounds_the_whole_opening_against_a_frozen_server(
    frozen_url: str,
) -> None:
    # The clean-up after the timeout was a closing handshake, which the frozen
    # server never answers: open_timeout ran ~10 s over.
    begin = time.monotonic()
    with pytest.raises(TimeoutError):
        await TranscribeClient.open(frozen_url, GOOD_KEY, open_timeout=0.5)
    assert time.monotonic() - begin < 1.5


async def test_cancelling_open_returns_at_once_against_a_frozen_server(frozen_url: str) -> None:
    # What a Ctrl-C while connecting does in the stream command: it must not wait
    # for the closing handshake either.
    opening = asyncio.create_task(TranscribeClient.open(frozen_url, GOOD_KEY, open_timeout=None))
    await asyncio.sleep(0.3)
    assert not opening.done()
    opening.cancel()
    cancelled_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert time.monotonic() - cancelled_at < 1


# ---------------------------------------------------------------- fast sending


async def test_fast_sending_stays_a_few_seconds_ahead_of_a_slow_server(
    fake_gateway: FakeGateway,
) -> None:
    # The server handles 20 ms of audio per 2 ms (10x real time). Sending fast
    # used to put the whole file in the socket's buffers, tens of seconds ahead
    # of the server, so a session.close (a Ctrl-C) waited behind all of it.
    fake_gateway.audio_delay_s = 0.002
    ahead: list[float] = []
    async with TranscribeClient.connect(fake_gateway.url, GOOD_KEY) as client:
        await client.configure()
        fake_gateway.on_audio = lambda handled: ahead.append(client.audio_seconds_sent - handled)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        begin = time.monotonic()
        result = await client.stream_samples(tone(60.0), fast=True, stop=stop)
        took = time.monotonic() - begin
    # FAST_AUDIO_AHEAD_S (5 s) and a ping's second, plus what the server's
    # WebSocket layer read at once (256 KiB reads: ~6 s) but has not handled yet.
    assert max(ahead) < 15.0, max(ahead)
    assert result.closed is not None and result.closed.reason == "client_close"
    assert result.audio_seconds < 30  # stopped early, with its session.closed...
    assert took < 4.0  # ...soon after the stop (~1 s of the server's backlog)
