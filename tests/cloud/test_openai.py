"""The OpenAI Realtime adapter's own protocol, through /ws against tests/emulators/openai.py.

What the adapter sends (path, ``intent``/``model`` query, auth header, the GA
``session.update``, base64 ``input_audio_buffer.append`` at 24 kHz, the final
``input_audio_buffer.commit``), how options map onto ``session.update``, that
silence (when OpenAI says nothing) is not taken for a dead provider, how
OpenAI's errors reach the client (most do not end the session), and how items
whose transcripts arrive late become utterances (stopped after their final).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.cloud.conftest import FINALIZE_TIMEOUT_S, RESPONSE_TIMEOUT_S, CloudWorld
from tests.cloud.test_common import (
    FIRST,
    LOCAL,
    close_and_collect,
    finals_text,
    first_audio,
    ms,
    open_ws,
)
from tests.emulators import openai as openai_emulator
from tests.emulators.catalog import CASES
from tests.emulators.openai import OpenAIEmulator
from tests.emulators.server import Faults
from tests.server.wsutil import open_session, recv_type, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType
from transcribe_gateway.providers.openai import Items, _ws_base

CASE = next(c for c in CASES if c.provider == "OPENAI")


@pytest.fixture
def openai(cloud: CloudWorld) -> Iterator[OpenAIEmulator]:
    emulator = cloud.emulator(CASE)
    assert isinstance(emulator, OpenAIEmulator)
    emulator.faults = Faults()
    emulator.reset()
    yield emulator
    emulator.faults = Faults()
    emulator.reset()  # the shared suite does not know this emulator's own knobs


async def test_client_sends_documented_events(cloud: CloudWorld, openai: OpenAIEmulator) -> None:
    ws, updated = await configure(
        cloud,
        prompt="Go forward ten meters.",
        endpointing=700,
        vad={"threshold": 0.6, "prefix_padding_ms": 200},
    )
    assert "unsupported" not in updated["session"]  # prompt, endpointing, vad all mapped
    audio = np.concatenate([first_audio(), silence(1.5)])
    await send_audio(ws, audio, realtime=2.0)
    final = await recv_type(ws, "transcription.completed", timeout=30)
    messages = await close_and_collect(ws)
    assert messages[-1]["type"] == "session.closed"
    assert normalize(final["text"]) == FIRST
    record = openai.records[-1]
    assert record.path == "/v1/realtime"
    assert record.query == {"intent": ["transcription"]}  # GA: no model in the URL
    assert record.headers["Authorization"] == f"Bearer {openai.api_key}"
    assert "OpenAI-Beta" not in record.headers  # the beta's header
    first, *appends, last = record.text
    assert first == {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {
                        "model": "gpt-4o-transcribe",
                        "language": "en",
                        "prompt": "Go forward ten meters.",
                    },
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.6,
                        "prefix_padding_ms": 200,
                        "silence_duration_ms": 700,
                    },
                }
            },
        },
    }
    assert {e["type"] for e in appends} == {"input_audio_buffer.append"}
    assert last["type"] == "input_audio_buffer.commit"
    assert record.finalized
    # Base64 pcm16 at 24 kHz in 20 ms frames, each client chunk at once (it waited
    # for 50 ms); the emulator heard all of it.
    sizes = [len(base64.b64decode(e["audio"])) for e in appends]
    assert set(sizes[:-1]) == {24000 * 2 // 50}, sizes
    assert abs(record.audio_ms - ms(audio)) < 120, (record.audio_ms, ms(audio))


async def test_gpt_realtime_is_a_text_only_session_that_never_replies(
    cloud: CloudWorld, openai: OpenAIEmulator
) -> None:
    ws, _ = await configure(cloud, model="gpt-realtime", language="de-DE")
    await send_audio(ws, silence(0.3))
    await close_and_collect(ws)
    record = openai.records[-1]
    assert record.query == {"model": ["gpt-realtime"]}
    session = record.text[0]["session"]
    assert session["type"] == "realtime"
    assert session["output_modalities"] == ["text"]
    audio_input = session["audio"]["input"]
    assert audio_input["transcription"] == {"model": "gpt-4o-transcribe", "language": "de"}
    turn = audio_input["turn_detection"]
    assert turn["create_response"] is False and turn["interrupt_response"] is False


async def test_mini_model_and_multi_language(cloud: CloudWorld, openai: OpenAIEmulator) -> None:
    ws, _ = await configure(cloud, model="gpt-4o-mini-transcribe", language="multi")
    await send_audio(ws, silence(0.3))
    await close_and_collect(ws)
    transcription = openai.records[-1].text[0]["session"]["audio"]["input"]["transcription"]
    assert transcription == {"model": "gpt-4o-mini-transcribe"}  # OpenAI detects the language


async def test_pause_and_silence_longer_than_the_response_timeout(
    cloud: CloudWorld, openai: OpenAIEmulator
) -> None:
    # OpenAI says nothing while nobody speaks, and has no keepalive message:
    # neither a pause in the audio nor silence may count as a dead provider.
    ws, _ = await configure(cloud)
    await asyncio.sleep(RESPONSE_TIMEOUT_S + 1)
    quiet = silence(RESPONSE_TIMEOUT_S + 1)
    await send_audio(ws, np.concatenate([quiet, first_audio(), silence(1.5)]), realtime=2.0)
    messages = await close_and_collect(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    assert normalize(finals_text(messages)) == FIRST
    started = next(m for m in messages if m["type"] == "speech.started")
    assert started["audio_start_ms"] >= ms(quiet) - 300  # OpenAI's times on our timeline


async def test_commit_with_nothing_left_ends_at_once(
    cloud: CloudWorld, openai: OpenAIEmulator
) -> None:
    # No audio: the final commit fails with input_audio_buffer_commit_empty,
    # which means nothing is pending, not that the provider failed.
    ws, _ = await configure(cloud)
    started = time.monotonic()
    messages = await close_and_collect(ws, timeout=FINALIZE_TIMEOUT_S + 10)
    assert [m["type"] for m in messages] == ["session.closed"], messages
    assert time.monotonic() - started < FINALIZE_TIMEOUT_S
    assert openai.records[-1].text[-1]["type"] == "input_audio_buffer.commit"


@pytest.mark.parametrize("with_event", [True, False], ids=["error-event", "close-only"])
async def test_refused_key(cloud: CloudWorld, openai: OpenAIEmulator, with_event: bool) -> None:
    # OpenAI accepts the upgrade, then refuses the key: an error event and/or close 3000.
    openai.faults.reject_auth = True
    openai.auth_error_event = with_event
    ws, _ = await open_ws(cloud)
    config = {"provider": CASE.provider, "model": CASE.model}
    await ws.send(json.dumps({"type": "session.update", "session": config}))
    error = (await recv_type(ws, "error", timeout=15))["error"]
    assert error["code"] == "provider_error"
    assert error["message"].startswith("OPENAI: authentication refused ("), error
    assert ("invalid_api_key: Incorrect API key" in error["message"]) is with_event
    assert not error.get("retryable")
    await ws.close()


async def test_transcription_failed_reaches_the_client(
    cloud: CloudWorld, openai: OpenAIEmulator
) -> None:
    openai.transcription_error = {
        "type": "server_error",
        "code": "transcription_failed",
        "message": "Audio could not be transcribed.",
        "param": None,
    }
    ws, _ = await configure(cloud)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    error = (await recv_type(ws, "error", timeout=30))["error"]
    assert error["code"] == "provider_error"
    assert error["message"] == (
        "OPENAI: transcription failed: transcription_failed: Audio could not be transcribed."
    )
    await ws.close()


async def test_recoverable_error_mid_stream_is_only_logged(
    cloud: CloudWorld, openai: OpenAIEmulator
) -> None:
    # "Most errors are recoverable and the session will stay open"
    # (https://developers.openai.com/api/reference/resources/realtime/server-events).
    openai.error_after_ms = 500
    ws, _ = await configure(cloud)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    messages = await close_and_collect(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    assert normalize(finals_text(messages)) == FIRST
    assert messages[-1]["type"] == "session.closed"


async def test_error_then_close_fails_naming_the_error(
    cloud: CloudWorld, openai: OpenAIEmulator
) -> None:
    openai.error_after_ms = 500
    openai.close_after_error = True
    ws, _ = await configure(cloud)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    error = (await recv_type(ws, "error", timeout=30))["error"]
    assert error["code"] == "provider_error"
    assert error["message"] == (
        "OPENAI: closed the connection (code 1011, server_error) "
        "after invalid_event: The 'type' field is missing."
    )
    await ws.close()


async def test_late_transcript_keeps_its_utterance() -> None:
    # Item A's transcript arrives after item B's speech started (transcription
    # is asynchronous): each item stays one utterance with its own events.
    events: list[SpeechEvent] = []

    async def emit(event: SpeechEvent) -> None:
        events.append(event)

    items = Items(emit)
    await items.started("A", 100)
    await items.stopped("A", 900)
    items.committed("A", 900)
    await items.started("B", 1200)
    await items.delta("A", "go", 1300)
    await items.delta("A", " forward", 1350)
    await items.completed("A", "Go forward.", 1400)
    await items.delta("B", "ten", 1900)
    items.committed("B2", 2000)  # a commit during speech may name a new item
    await items.completed("B2", "Ten meters.", 2100)
    await items.completed("A", "late duplicate", 2200)  # ignored: A is finished
    assert not items.pending
    seen = [(e.type.value, e.utterance, e.text, e.start_ms, e.end_ms) for e in events]
    assert seen == [
        ("speech_started", 0, "", 100, 0),
        ("speech_started", 1, "", 1200, 0),
        ("partial", 0, "go", 0, 0),
        ("partial", 0, "go forward", 0, 0),
        ("final", 0, "Go forward.", 100, 900),
        ("speech_stopped", 0, "", 0, 900),  # held until its final, at OpenAI's end
        ("partial", 1, "ten", 0, 0),
        ("final", 1, "Ten meters.", 1200, 2000),
        ("speech_stopped", 1, "", 0, 2000),
    ]
    assert [e.type for e in events].count(SpeechEventType.FINAL) == 2


async def test_stream_end_turns_shown_text_into_the_final() -> None:
    events: list[SpeechEvent] = []

    async def emit(event: SpeechEvent) -> None:
        events.append(event)

    items = Items(emit)
    await items.started("A", 0)
    await items.delta("A", "go forward", 500)
    await items.flush()
    assert [(e.type.value, e.text) for e in events] == [
        ("speech_started", ""),
        ("partial", "go forward"),
        ("final", "go forward"),
        ("speech_stopped", ""),
    ]


def test_base_url_forms() -> None:
    assert _ws_base("wss://api.openai.com") == "wss://api.openai.com"
    assert _ws_base("https://api.openai.com/v1") == "wss://api.openai.com"  # the SDKs' form
    assert _ws_base("http://127.0.0.1:9000/") == "ws://127.0.0.1:9000"
    assert _ws_base("proxy.example:8443/openai") == "wss://proxy.example:8443/openai"


async def configure(cloud: CloudWorld, **config: Any) -> tuple[Any, dict[str, Any]]:
    """A session served by OPENAI: the socket and its ``session.updated``."""
    config = {"model": CASE.model, **config}
    ws, updated = await open_session(cloud.gateway.url, provider=CASE.provider, **config)
    assert updated["session"]["provider"] == CASE.provider, updated
    return ws, updated


@pytest.mark.parametrize("fallback", [None, LOCAL], ids=["alone", "with-fallback"])
async def test_a_stop_held_for_a_transcript_that_never_comes_is_still_sent(
    cloud: CloudWorld, monkeypatch: pytest.MonkeyPatch, fallback: dict[str, str] | None
) -> None:
    # OpenAI's speech_stopped comes, its transcript never does: the stream fails
    # (no answer within the response timeout). Our speech.stopped waited for the
    # transcript, and was never sent; every utterance started must be stopped.
    monkeypatch.setattr(openai_emulator, "TRANSCRIPT_DELAY_S", 60.0)
    config = {"fallback": fallback} if fallback else {}
    ws, _ = await configure(cloud, **config)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    messages: list[dict[str, Any]] = []
    while not messages or messages[-1]["type"] != "error":  # the failure
        messages.append(json.loads(await asyncio.wait_for(ws.recv(), RESPONSE_TIMEOUT_S + 10)))
    messages += await close_and_collect(ws)
    started = [m["utterance_id"] for m in messages if m["type"] == "speech.started"]
    stopped = [m["utterance_id"] for m in messages if m["type"] == "speech.stopped"]
    assert started and sorted(started) == sorted(stopped), messages
    if fallback:  # the replay gave the words to the fallback
        assert normalize(finals_text(messages)) == FIRST
