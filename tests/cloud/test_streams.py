"""Each cloud adapter's stream driven directly (no gateway), against its emulator.

What the end-to-end tests cannot pin down: how a stream ends when the
provider closes before answering the finalize, deadlines when the client
sends faster than real time to a provider that transcribes in real time,
what a push held back by a stuck provider leaves behind when the client goes,
and that the gateway's own VAD (Cartesia, ElevenLabs) never stalls the event
loop on long chunks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pytest
import soxr

from tests.cloud.test_common import first_audio
from tests.emulators.catalog import CASES, CloudCase
from tests.emulators.server import Emulator, Faults
from tests.providers.loop_watch import longest_stall, push_all
from tests.server.wsutil import silence
from tests.textnorm import normalize
from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import (
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)
from transcribe_gateway.providers.cartesia import CartesiaSTT
from transcribe_gateway.providers.cloud import CloudSTT
from transcribe_gateway.providers.deepgram import DeepgramSTT
from transcribe_gateway.providers.elevenlabs import ElevenLabsSTT
from transcribe_gateway.providers.openai import OpenAISTT
from transcribe_gateway.providers.qwen import QwenSTT
from transcribe_gateway.providers.soniox import SonioxSTT

FIRST = "go forward ten meters"
STTS: dict[str, type[CloudSTT]] = {
    "DEEPGRAM": DeepgramSTT,
    "SONIOX": SonioxSTT,
    "QWEN3": QwenSTT,
    "CARTESIA": CartesiaSTT,
    "ELEVENLABS": ElevenLabsSTT,
    "OPENAI": OpenAISTT,
}
TIMEOUT_S = 3.0
"""Response and finalize timeouts (as in the end-to-end cloud tests)."""
E = TypeVar("E", bound=Emulator)


def settings(emulator: Emulator, provider: str) -> Settings:
    config = Settings()
    config.providers = {provider: {"api_key": emulator.api_key, "base_url": emulator.url}}
    config.provider_connect_timeout_s = TIMEOUT_S
    config.provider_response_timeout_s = TIMEOUT_S
    config.provider_finalize_timeout_s = TIMEOUT_S
    return config


@dataclass
class Outcome:
    events: list[SpeechEvent] = field(default_factory=list)
    error: ProviderError | None = None
    ended_at: float = 0.0

    @property
    def finals(self) -> str:
        return " ".join(e.text for e in self.events if e.type is SpeechEventType.FINAL)


async def consume(stream: RecognizeStream) -> Outcome:
    outcome = Outcome()
    try:
        async for event in stream:
            outcome.events.append(event)
    except ProviderError as exc:
        outcome.error = exc
    outcome.ended_at = time.monotonic()
    return outcome


@contextlib.asynccontextmanager
async def opened(case: CloudCase, faults: Faults) -> AsyncIterator[tuple[RecognizeStream, int]]:
    """A fresh emulator with ``faults`` and a stream of the case's model to it."""
    async with case.emulator(faults) as emulator:
        stt = STTS[case.provider](settings(emulator, case.provider))
        rate = next(m.input_rate for m in stt.models() if m.name == case.model)
        assert rate is not None
        stream = await stt.open_stream(StreamOptions(model=case.model, sample_rate=rate))
        try:
            yield stream, rate
        finally:
            await stream.aclose()


def at_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == 16000:
        return samples
    return np.asarray(soxr.resample(samples, 16000, rate), np.int16)


async def push(stream: RecognizeStream, samples: np.ndarray, rate: int) -> None:
    """As fast as the stream takes it, in 20 ms chunks (a file sent with ``--fast``)."""
    step = rate // 50
    for i in range(0, len(samples), step):
        chunk = samples[i : i + step]
        if not stream.push_audio_nowait(chunk):
            await stream.push_audio(chunk)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_a_close_before_the_done_message_is_a_retryable_failure(case: CloudCase) -> None:
    # The provider goes away (1001, a rolling restart) when the finalize arrives,
    # before answering it.  Taken for "flushed", the stream ended without an
    # error: the words the provider had not sent yet were lost, no fallback.
    async with opened(case, Faults(close_on_finalize=1001)) as (stream, rate):
        events = asyncio.create_task(consume(stream))
        await push(stream, at_rate(first_audio(), rate), rate)  # no trailing silence
        await stream.end_input()
        outcome = await asyncio.wait_for(events, 30)
    if case.model == "flux-general-en":
        # Flux's only "done" is its close after CloseStream: it cannot be told apart.
        assert outcome.error is None, outcome
        return
    assert outcome.error is not None, outcome.events
    assert outcome.error.retryable  # the session's fallback replays the audio
    assert "closed the connection before" in outcome.error.reason, outcome.error


FAST = [c for c in CASES if c.id != "OPENAI/gpt-realtime"]
"""One case per stream class (gpt-realtime is the same OpenAI stream)."""


@pytest.mark.parametrize("case", FAST, ids=[c.id for c in FAST])
async def test_a_file_sent_fast_to_a_real_time_provider_is_not_a_timeout(
    case: CloudCase,
) -> None:
    # The whole file is sent in a fraction of a second; the provider hears it
    # as it plays, so it answers the flushes and the finalize seconds after
    # they were sent.  The deadlines counted from the send: "no answer to the
    # finalize within 3 s" from a provider that was working all along.
    audio = np.concatenate([silence(0.5), first_audio(), silence(4.0)])
    async with opened(case, Faults(realtime=True)) as (stream, rate):
        events = asyncio.create_task(consume(stream))
        started = time.monotonic()
        await push(stream, at_rate(audio, rate), rate)
        assert time.monotonic() - started < 2.0  # sent far faster than it plays
        await stream.end_input()
        outcome = await asyncio.wait_for(events, 60)
    assert outcome.error is None, outcome.error
    assert normalize(outcome.finals) == FIRST, outcome.events
    assert outcome.ended_at - started >= len(audio) / 16000  # it did hear it at 1x


SILENT = [
    c
    for c in CASES
    if c.id in ("DEEPGRAM/nova-3", "CARTESIA/ink-whisper", "OPENAI/gpt-4o-transcribe")
]
"""One provider that answers all audio, one with the gateway's VAD, one with a server VAD."""


@pytest.mark.parametrize("case", SILENT, ids=[c.id for c in SILENT])
async def test_a_silent_provider_still_fails_once_it_has_heard_the_audio(
    case: CloudCase,
) -> None:
    # The counterpart: a provider that stops answering fails within the
    # timeouts counted from when it could have heard the audio (sent fast here).
    audio = np.concatenate([silence(0.5), first_audio(), silence(2.0)])
    played = len(audio) / 16000
    async with opened(case, Faults(realtime=True, stall_after_ms=300)) as (stream, rate):
        events = asyncio.create_task(consume(stream))
        started = time.monotonic()
        await push(stream, at_rate(audio, rate), rate)
        await stream.end_input()
        outcome = await asyncio.wait_for(events, 60)
    assert outcome.error is not None, outcome.events
    assert "answer" in outcome.error.reason, outcome.error
    assert outcome.ended_at - started < played + TIMEOUT_S + 2.0


@contextlib.asynccontextmanager
async def stuck_provider() -> AsyncIterator[str]:
    """Answers the WebSocket upgrade, then never reads again (a hung provider)."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455
        accept = base64.b64encode(hashlib.sha1(key + magic).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()


def pending_puts() -> list[asyncio.Task[object]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "Queue.put"
    ]


async def test_a_push_cancelled_on_a_stuck_provider_leaves_no_task() -> None:
    # The client left while a push waited for room in the outbox: its put was
    # never cancelled and outlived the stream ("Task was destroyed but it is
    # pending!").
    async with stuck_provider() as url:
        config = Settings()
        config.providers = {"DEEPGRAM": {"api_key": "key", "base_url": url}}
        config.provider_response_timeout_s = 30.0  # the send never times out here
        stream = await DeepgramSTT(config).open_stream(StreamOptions(model="nova-3"))
        chunk = np.zeros(32000, np.int16)
        for _ in range(10_000):  # until the socket and the outbox are full
            if not stream.push_audio_nowait(chunk):
                break
            await asyncio.sleep(0)  # the sender fills the socket
        else:
            pytest.fail("the stuck provider never held the audio back")
        work = asyncio.create_task(stream.push_audio(chunk))  # the session's push, held back
        await asyncio.sleep(0.3)
        assert not work.done()
        work.cancel()  # the client is gone
        await asyncio.gather(work, return_exceptions=True)
        await stream.aclose()
        left = pending_puts()
        for task in left:
            task.cancel()
        assert left == []


@contextlib.asynccontextmanager
async def on_own_loop(emulator: E) -> AsyncIterator[E]:
    """``emulator`` served from a thread and event loop of its own, as a provider
    is another machine: its work (it hears a backlog of frames with Silero, all
    at once) does not show in this loop's stalls."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="emulator", daemon=True)
    thread.start()
    try:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(emulator.__aenter__(), loop))
        try:
            yield emulator
        finally:
            stop = emulator.__aexit__(None, None, None)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(stop, loop))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()


LOCAL_VAD = [c for c in CASES if c.provider in ("CARTESIA", "ELEVENLABS")]
"""The streams whose utterances the gateway's own Silero VAD cuts."""
PHONE_CHUNK = 2 * 128 * 1024
"""The largest chunk a phone client sends (128 KiB of 8 kHz mu-law, 16.4 s), at 16 kHz."""


@pytest.mark.parametrize("case", LOCAL_VAD, ids=[c.id for c in LOCAL_VAD])
async def test_long_chunks_from_phone_lines_never_stall_the_event_loop(case: CloudCase) -> None:
    # Phone clients sending the largest chunk back to back (a file, or silence,
    # faster than real time). The stream heard each with Silero on the event
    # loop (twice: a phone line), ~60 ms per chunk, and eight such streams
    # stalled every session of the server for 0.46-1.2 s on two cores. Now a
    # long chunk is heard on a worker thread, as LOCAL's are: 15-110 ms, what
    # is left being the VAD threads and the emulator busy on the same cores.
    # Speech in a long chunk is found where it is.
    streams: list[RecognizeStream] = []
    async with on_own_loop(case.emulator()) as emulator:
        stt = STTS[case.provider](settings(emulator, case.provider))
        try:
            for _ in range(8):
                options = StreamOptions(model=case.model, source_rate=8000)
                streams.append(await stt.open_stream(options))
            first, *others = streams
            events = asyncio.create_task(consume(first))
            flood = [
                push_all(s, (np.zeros(PHONE_CHUNK, np.int16) for _ in range(2))) for s in streams
            ]
            _, stall = await longest_stall(asyncio.gather(*flood))
            assert stall < 0.2, stall
            for other in others:
                await other.aclose()
            await push_all(first, [np.concatenate([first_audio(), silence(1.0)])])
            await first.end_input()
            outcome = await asyncio.wait_for(events, 60)
        finally:
            for stream in streams:
                await stream.aclose()
    assert outcome.error is None, outcome.error
    assert normalize(outcome.finals) == FIRST, outcome.events
    (started,) = [e for e in outcome.events if e.type is SpeechEventType.SPEECH_STARTED]
    flood_ms = 2 * PHONE_CHUNK * 1000 // 16000
    assert flood_ms < started.start_ms < flood_ms + 500, started  # speech starts ~0.46 s in
