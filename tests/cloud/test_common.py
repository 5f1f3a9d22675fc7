"""Every cloud adapter, end to end through the gateway's /ws, against its emulator.

The same behaviour is asked of every provider: a normal utterance, the flush
on ``session.close``, refused credentials, a provider that drops mid-stream
(with and without a fallback), one that stops answering, and one that never
answers the finalize.  Each adapter's own protocol details (URL, query,
headers, message shapes) are tested in its own module next to this one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

from tests.cloud.conftest import FINALIZE_TIMEOUT_S, RESPONSE_TIMEOUT_S, CloudWorld
from tests.conftest import SHARED_AUDIO
from tests.emulators.catalog import CASES, CloudCase
from tests.emulators.server import Faults
from tests.server.wsutil import collect, open_session, recv_type, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio

LOCAL = {"provider": "LOCAL", "model": "whisper-tiny.en"}
FIRST = "go forward ten meters"
SECOND = "he was not an ill disposed young man"


def first_audio() -> np.ndarray:
    return read_audio(SHARED_AUDIO / "goforward.raw")


def second_audio() -> np.ndarray:
    return read_audio(SHARED_AUDIO / "sense_and_sensibility_01_austen_64kb-0880.wav")


def ms(samples: np.ndarray) -> float:
    return len(samples) / 16


def covers(text: str, reference: str, ratio: float = 0.8) -> bool:
    """Whether ``text`` holds at least ``ratio`` of the reference's words."""
    have = Counter(normalize(text).split())
    want = Counter(normalize(reference).split())
    found = sum(min(n, have[w]) for w, n in want.items())
    return found >= ratio * sum(want.values())


def finals_text(messages: list[dict[str, Any]]) -> str:
    return " ".join(m["text"] for m in messages if m["type"] == "transcription.completed")


def assert_utterance_order(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each utterance's events read started, partials, completed (if any text), stopped.

    The order docs/protocol.md promises within one utterance.  Returns each
    utterance's events, in the order the utterances started.
    """
    utterances: dict[str, list[dict[str, Any]]] = {}
    for message in messages:
        if "utterance_id" in message:
            utterances.setdefault(message["utterance_id"], []).append(message)
    for events in utterances.values():
        types = [m["type"] for m in events]
        kinds = [t for t in types if t != "transcription.partial"]
        assert kinds in (
            ["speech.started", "transcription.completed", "speech.stopped"],
            ["speech.started", "speech.stopped"],
        ), types
        last = types.index(kinds[1])  # no partial after the completed (or the stop)
        assert "transcription.partial" not in types[last:], types
    return list(utterances.values())


async def session(cloud: CloudWorld, case: CloudCase, **config: Any) -> Any:
    ws, updated = await open_session(
        cloud.gateway.url, provider=case.provider, model=case.model, **config
    )
    assert updated["session"]["provider"] == case.provider, updated
    return ws


async def close_and_collect(ws: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "session.close"}))
    return await collect(ws, timeout)


async def speak_pause_speak(ws: Any) -> tuple[list[dict[str, Any]], np.ndarray]:
    """FIRST, 9 s with no audio at all (the client paused), FIRST again, close.

    The pause outlasts a provider idle close of 7 s and the keepalive after 5 s
    without audio, and stays under the test gateway's own 10 s idle limit.
    Returns every message and the utterance sent twice.
    """
    utterance = np.concatenate([first_audio(), silence(1.0)])
    await send_audio(ws, utterance, realtime=2.0)
    await asyncio.sleep(9)
    await send_audio(ws, utterance, realtime=2.0)
    return await close_and_collect(ws), utterance


async def test_utterance_end_to_end(cloud: CloudWorld, case: CloudCase) -> None:
    ws = await session(cloud, case)
    audio = np.concatenate([silence(0.3), first_audio(), silence(1.5)])
    await send_audio(ws, audio, realtime=2.0)
    final = await recv_type(ws, "transcription.completed", timeout=30)
    assert normalize(final["text"]) == FIRST
    assert 0 <= final["start_ms"] < final["end_ms"] <= ms(audio) + 50
    messages = await close_and_collect(ws)
    assert messages[-1]["type"] == "session.closed"
    record = cloud.emulator(case).records[-1]
    # Everything the client sent reached the provider (rate conversion included).
    assert abs(record.audio_ms - ms(audio)) < 120, (record.audio_ms, ms(audio))


async def test_event_order_for_one_utterance(cloud: CloudWorld, case: CloudCase) -> None:
    ws = await session(cloud, case)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    messages = await close_and_collect(ws)
    kinds = [m["type"] for m in messages if m["type"] != "transcription.partial"]
    assert kinds.count("transcription.completed") == 1, kinds
    # One utterance: started, partials, completed, stopped, in that order.
    [events] = assert_utterance_order(messages)
    assert events[-2]["type"] == "transcription.completed"
    for partial in (m for m in messages if m["type"] == "transcription.partial"):
        assert partial["text"].strip()


HELD_STOPS = [next(c for c in CASES if c.provider == p) for p in ("OPENAI", "QWEN3")]
"""Providers whose speech_stopped comes before the transcript: ours is held for it."""


@pytest.mark.parametrize("held", HELD_STOPS, ids=[c.id for c in HELD_STOPS])
async def test_a_stop_sent_before_the_transcript_follows_the_final(
    cloud: CloudWorld, held: CloudCase
) -> None:
    # The client must still get started, partials, completed, stopped
    # (docs/protocol.md), and the stop keeps the provider's audio_end_ms.
    cloud.emulator(held).faults = Faults()
    ws = await session(cloud, held)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    messages = await close_and_collect(ws)
    [events] = assert_utterance_order(messages)
    final, stopped = events[-2], events[-1]
    assert normalize(final["text"]) == FIRST
    assert stopped["audio_end_ms"] == final["end_ms"]


async def test_close_flushes_trailing_words(cloud: CloudWorld, case: CloudCase) -> None:
    ws = await session(cloud, case)
    await send_audio(ws, first_audio(), realtime=2.0)  # no trailing silence: still talking
    messages = await close_and_collect(ws)
    assert normalize(finals_text(messages)) == FIRST, messages
    assert messages[-1]["type"] == "session.closed"
    assert cloud.emulator(case).records[-1].finalized


async def test_refused_credentials(cloud: CloudWorld, case: CloudCase) -> None:
    cloud.emulator(case).faults.reject_auth = True
    ws, _ = await open_ws(cloud)
    await ws.send(
        json.dumps(
            {"type": "session.update", "session": {"provider": case.provider, "model": case.model}}
        )
    )
    error = await recv_type(ws, "error", timeout=15)
    assert error["error"]["code"] == "provider_error", error
    assert case.provider in error["error"]["message"]
    assert "auth" in error["error"]["message"].lower()
    # The session stays open for another session.update.
    await ws.send(json.dumps({"type": "session.update", "session": LOCAL}))
    updated = await recv_type(ws, "session.updated")
    assert updated["session"]["provider"] == "LOCAL"
    await ws.close()


async def open_ws(cloud: CloudWorld) -> tuple[Any, dict[str, Any]]:
    from tests.server.wsutil import connect, recv

    ws = await connect(cloud.gateway.url)
    return ws, await recv(ws)


async def test_drop_mid_stream_without_fallback(cloud: CloudWorld, case: CloudCase) -> None:
    first = np.concatenate([first_audio(), silence(1.5)])
    cloud.emulator(case).faults.drop_after_ms = ms(first) + 1000
    ws = await session(cloud, case)
    await send_audio(ws, np.concatenate([first, second_audio(), silence(1.0)]), realtime=2.0)
    error = await recv_type(ws, "error", timeout=30)
    assert error["error"]["code"] == "provider_error"
    assert case.provider in error["error"]["message"]
    # The session is still open: a new session.update is served.
    await ws.send(json.dumps({"type": "session.update", "session": LOCAL}))
    await recv_type(ws, "session.updated")
    messages = await close_and_collect(ws)
    assert messages[-1]["type"] == "session.closed"


async def test_drop_mid_stream_falls_back_without_losing_words(
    cloud: CloudWorld, case: CloudCase
) -> None:
    first = np.concatenate([first_audio(), silence(2.0)])
    cloud.emulator(case).faults.drop_after_ms = ms(first) + 1200  # inside the second sentence
    ws = await session(cloud, case, fallback=LOCAL)
    await send_audio(ws, np.concatenate([first, second_audio(), silence(1.5)]), realtime=1.0)
    messages = await close_and_collect(ws)
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["provider_error"], errors
    assert case.provider in errors[0]["error"]["message"]
    after = normalize(finals_text(messages[messages.index(errors[0]) :]))
    everything = normalize(finals_text(messages))
    # Nothing lost: the second sentence's first words were spoken before the
    # drop, so they are there only because the audio was replayed ...
    assert "he was" in after, after
    assert covers(after, SECOND, 0.7), after
    assert covers(everything, FIRST), everything
    # ... and nothing doubled: audio already final was not replayed.
    assert everything.split().count("forward") == 1, everything


async def test_provider_that_stops_answering(cloud: CloudWorld, case: CloudCase) -> None:
    cloud.emulator(case).faults.stall_after_ms = 300
    ws = await session(cloud, case)
    started = time.monotonic()
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    error = await recv_type(ws, "error", timeout=RESPONSE_TIMEOUT_S + FINALIZE_TIMEOUT_S + 10)
    assert error["error"]["code"] == "provider_error"
    assert "answer" in error["error"]["message"], error
    messages = await close_and_collect(ws, timeout=10)
    assert messages[-1]["type"] == "session.closed"
    assert time.monotonic() - started < 30


async def test_stalled_provider_falls_back(cloud: CloudWorld, case: CloudCase) -> None:
    cloud.emulator(case).faults.stall_after_ms = 300
    ws = await session(cloud, case, fallback=LOCAL)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    await asyncio.sleep(RESPONSE_TIMEOUT_S)  # silence: the provider should have answered
    messages = await close_and_collect(ws)
    assert any(m["type"] == "error" for m in messages)
    assert normalize(finals_text(messages)) == FIRST, messages


async def test_finalize_that_never_returns(cloud: CloudWorld, case: CloudCase) -> None:
    cloud.emulator(case).faults.ignore_finalize = True
    ws = await session(cloud, case)
    await send_audio(ws, first_audio(), realtime=2.0)
    started = time.monotonic()
    messages = await close_and_collect(ws, timeout=FINALIZE_TIMEOUT_S + 15)
    assert messages[-1]["type"] == "session.closed"
    assert time.monotonic() - started < FINALIZE_TIMEOUT_S + 10
    assert any(m["type"] == "error" for m in messages), messages


HANDSHAKES = [c for c in CASES if c.provider in ("OPENAI", "QWEN3", "ELEVENLABS")]
"""The adapters that wait for the provider's greeting before they take audio."""


@pytest.mark.parametrize("greeting", HANDSHAKES, ids=[c.id for c in HANDSHAKES])
async def test_a_greeting_that_is_not_json_is_a_provider_error(
    cloud: CloudWorld, greeting: CloudCase
) -> None:
    # It closed the session 1011 (a ValueError, not a provider failure), skipped
    # the fallback, and left the provider's socket open.
    emulator = cloud.emulator(greeting)
    emulator.faults = Faults(handshake="garbled")
    ws, _ = await open_ws(cloud)
    update = {"provider": greeting.provider, "model": greeting.model, "fallback": LOCAL}
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    # Served by the fallback, the client told why.
    error = await recv_type(ws, "error")
    assert error["error"]["code"] == "provider_error", error
    assert "unreadable handshake answer" in error["error"]["message"]
    assert (await recv_type(ws, "session.updated"))["session"]["provider"] == "LOCAL"
    messages = await close_and_collect(ws)
    assert messages[-1]["type"] == "session.closed"
    await wait_ended(emulator.records[-1])


async def wait_ended(record: Any, timeout: float = 5.0) -> None:
    """Until the gateway's connection to the emulator is over."""
    for _ in range(int(timeout / 0.05)):
        if record.ended:
            break
        await asyncio.sleep(0.05)
    assert record.ended, "the gateway left the provider's socket open"


@pytest.mark.parametrize("greeting", HANDSHAKES, ids=[c.id for c in HANDSHAKES])
async def test_a_client_gone_during_the_greeting_leaves_no_provider_socket(
    cloud: CloudWorld, greeting: CloudCase
) -> None:
    # The provider took the upgrade but had not greeted when the client left:
    # the handshake's wait was cancelled and nothing closed the socket.
    emulator = cloud.emulator(greeting)
    emulator.faults = Faults(handshake="silent")
    before = len(emulator.records)
    ws, _ = await open_ws(cloud)
    update = {"provider": greeting.provider, "model": greeting.model}
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    for _ in range(100):
        if len(emulator.records) > before:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # upgraded, waiting for the greeting
    ws.transport.abort()
    await wait_ended(emulator.records[-1], timeout=2.0)  # under the 3 s connect timeout


async def test_a_provider_silent_during_a_file_sent_fast_falls_back(cloud: CloudWorld) -> None:
    # The stream's deadlines count from when a real-time provider can have heard
    # the audio sent ahead; the session's drain (5 s of silence here) cut the
    # stream off first, and a cut-off never falls back: the rest was lost.
    case = next(c for c in CASES if (c.provider, c.model) == ("DEEPGRAM", "nova-3"))
    cloud.emulator(case).faults = Faults(realtime=True, stall_after_ms=3000)
    ws = await session(cloud, case, fallback={"provider": "FAULTY", "model": "echo"})
    audio = np.concatenate([first_audio(), silence(1.0)] * 3)
    await send_audio(ws, audio)  # at once
    messages = await close_and_collect(ws)
    errors = [m["error"]["message"] for m in messages if m["type"] == "error"]
    assert len(errors) == 1 and "switching to the fallback FAULTY/echo" in errors[0], errors
    # The fallback was given what the provider had not made final, to the end.
    finals = [m for m in messages if m["type"] == "transcription.completed"]
    assert finals and finals[-1]["end_ms"] >= ms(audio) - 500, finals
    assert messages[-1]["type"] == "session.closed"
