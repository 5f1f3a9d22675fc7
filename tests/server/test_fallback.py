"""Fallback: a provider that fails mid-stream is replaced without losing audio.

The failing engine is the ``FAULTY`` plugin (tests/plugins/faulty.py), which
fails after 0.5 s of audio; the fallback is the real embedded engine.  The
cloud adapters' own failures (drops, stalls, refused keys) are tested against
their emulators in tests/cloud/.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from tests.conftest import SHARED_AUDIO, GatewayProcess
from tests.server.wsutil import collect, open_session, recv, recv_type, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.server.replay import ReplayBuffer

LOCAL = {"provider": "LOCAL", "model": "whisper-tiny.en"}


async def test_failure_mid_stream_switches_to_the_fallback(gateway: GatewayProcess) -> None:
    ws, updated = await open_session(
        gateway.url, provider="FAULTY", model="fail-after-audio", fallback=LOCAL
    )
    assert updated["session"]["provider"] == "FAULTY"
    assert updated["session"]["fallback"] == LOCAL
    assert not updated["session"].get("unsupported")
    audio = np.concatenate([read_audio(SHARED_AUDIO / "goforward.raw"), silence(1.0)])
    await send_audio(ws, audio, realtime=4.0)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    kinds = [m["type"] for m in messages]
    error = messages[kinds.index("error")]
    assert error["error"]["code"] == "provider_error"
    assert "FAULTY" in error["error"]["message"] and "LOCAL" in error["error"]["message"]
    switched = messages[kinds.index("session.updated")]
    assert switched["session"]["provider"] == "LOCAL"
    assert switched["session"]["requested_provider"] == "FAULTY"
    # All the audio, including what the failed engine had taken, is transcribed once.
    finals = [m for m in messages if m["type"] == "transcription.completed"]
    assert [normalize(f["text"]) for f in finals] == ["go forward ten meters"]
    assert finals[0]["start_ms"] < 500  # timed from the session's first sample
    assert kinds[-1] == "session.closed"


async def test_fallback_used_when_the_primary_cannot_open(gateway: GatewayProcess) -> None:
    ws, _ = await open_session(gateway.url, provider="LOCAL")  # a first, working config
    await ws.send(
        json.dumps(
            {
                "type": "session.update",
                "session": {"provider": "FAULTY", "model": "refuse-on-open", "fallback": LOCAL},
            }
        )
    )
    messages = []
    while True:
        msg = json.loads(await ws.recv())
        messages.append(msg)
        if msg["type"] == "session.updated":
            break
    assert messages[0]["type"] == "error"
    assert messages[0]["error"]["code"] == "provider_error"
    assert messages[-1]["session"]["provider"] == "LOCAL"
    assert messages[-1]["session"]["requested_provider"] == "FAULTY"
    await send_audio(ws, np.concatenate([read_audio(SHARED_AUDIO / "goforward.raw"), silence(1.0)]))
    await ws.send(json.dumps({"type": "session.close"}))
    rest = await collect(ws)
    texts = [normalize(m["text"]) for m in rest if m["type"] == "transcription.completed"]
    assert texts == ["go forward ten meters"]


async def test_audio_over_the_fallback_buffer_is_named_in_the_switch() -> None:
    # 3 s without a final, 1 s of buffer: the fallback could be given only the last
    # second, and the client was not told that the first two were lost.
    server = GatewayProcess("fallback-buffer", env={"TRANSCRIBE_FALLBACK_BUFFER_S": "1"})
    try:
        fallback = {"provider": "FAULTY", "model": "echo"}
        ws, _ = await open_session(
            server.url, provider="FAULTY", model="fail-after-3s", fallback=fallback
        )
        await send_audio(ws, np.zeros(16000 * 3, np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws)
        errors = [m["error"]["message"] for m in messages if m["type"] == "error"]
        assert len(errors) == 1 and "switching to the fallback" in errors[0], messages
        assert "the first 2 s of audio since the last final" in errors[0], errors
        assert "fallback_buffer_s (1 s)" in errors[0]
        finals = [m["text"] for m in messages if m["type"] == "transcription.completed"]
        assert finals == ["chunk 0", "chunk 1"], finals  # the last second, replayed
    finally:
        assert server.stop() == 0


async def test_an_engine_that_ends_its_stream_early_is_a_failure(gateway: GatewayProcess) -> None:
    # Its stream ended cleanly after 0.5 s: the rest of the audio was taken,
    # billed and dropped without a word, and the fallback never used.
    fallback = {"provider": "FAULTY", "model": "echo"}
    ws, _ = await open_session(
        gateway.url, provider="FAULTY", model="quit-early", fallback=fallback
    )
    await send_audio(ws, np.zeros(16000 * 3, np.int16), realtime=4.0)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    errors = [m["error"]["message"] for m in messages if m["type"] == "error"]
    assert len(errors) == 1, messages
    assert "ended the stream before the end of the audio" in errors[0]
    assert "switching to the fallback" in errors[0]
    # Every second of the audio is transcribed: the first half second by the
    # engine that quit, the rest replayed into the fallback.
    spans = [
        (m["start_ms"], m["end_ms"]) for m in messages if m["type"] == "transcription.completed"
    ]
    assert spans == [(0, 500), (500, 1000), (1000, 1500), (1500, 2000), (2000, 2500), (2500, 3000)]


async def test_a_fallback_after_a_pause_keeps_the_session_timeline(
    gateway: GatewayProcess,
) -> None:
    # Every word was final when the provider dropped (the client paused), so no
    # audio was left to replay: the fallback's times began again at 0.
    fallback = {"provider": "FAULTY", "model": "echo"}
    ws, _ = await open_session(
        gateway.url, provider="FAULTY", model="drop-when-quiet", fallback=fallback
    )
    await send_audio(ws, np.zeros(16000, np.int16))
    spans: list[tuple[int, int]] = []
    while len(spans) < 2:
        msg = await recv(ws)
        if msg["type"] == "transcription.completed":
            spans.append((msg["start_ms"], msg["end_ms"]))
    switched = await recv_type(ws, "session.updated", timeout=10)  # dropped after 1 s quiet
    assert switched["session"]["provider"] == "FAULTY"
    await send_audio(ws, np.zeros(16000, np.int16))
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    spans += [
        (m["start_ms"], m["end_ms"]) for m in messages if m["type"] == "transcription.completed"
    ]
    assert spans == [(0, 500), (500, 1000), (1000, 1500), (1500, 2000)], messages


async def test_an_engine_that_stops_taking_audio_has_failed(gateway: GatewayProcess) -> None:
    # It neither fails nor takes audio: the push waited for ever, the close held
    # behind it was never read, and the idle timeout never came (a push waiting
    # keeps the session busy): the session lasted as long as the client stayed.
    fallback = {"provider": "FAULTY", "model": "echo"}
    ws, _ = await open_session(gateway.url, provider="FAULTY", model="stall", fallback=fallback)
    await send_audio(ws, np.zeros(16000 * 2, np.int16))
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)  # the 5 s drain_timeout_s of no progress, then the switch
    errors = [m["error"]["message"] for m in messages if m["type"] == "error"]
    assert len(errors) == 1 and "took no audio and showed no progress for 5 s" in errors[0]
    assert "switching to the fallback" in errors[0], errors
    spans = [
        (m["start_ms"], m["end_ms"]) for m in messages if m["type"] == "transcription.completed"
    ]
    assert spans == [(0, 500), (500, 1000), (1000, 1500), (1500, 2000)], messages
    assert messages[-1]["type"] == "session.closed"


async def test_a_fallback_that_stops_taking_the_replay_has_failed(gateway: GatewayProcess) -> None:
    # The replay into the fallback had no bound: a fallback that stopped taking
    # audio held the switch, and session.close (which waits for it) for ever.
    stall = {"provider": "FAULTY", "model": "stall"}
    ws, _ = await open_session(
        gateway.url, provider="FAULTY", model="fail-after-3s", fallback=stall
    )
    await send_audio(ws, np.zeros(16000 * 4, np.int16))
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)  # the fallback's 5 s of no progress, then the end
    errors = [m["error"]["message"] for m in messages if m["type"] == "error"]
    assert "switching to the fallback FAULTY/stall" in errors[0], errors
    assert "took no audio and showed no progress" in errors[-1], errors
    assert messages[-1]["type"] == "session.closed"


def audio_seconds(server: GatewayProcess, provider: str) -> float:
    """``transcribe_audio_seconds_total`` of ``provider`` on ``/metrics``."""
    return server.metric(f'transcribe_audio_seconds_total{{provider="{provider}"}}') or 0.0


async def test_the_failed_provider_keeps_its_audio_in_the_metrics(
    gateway: GatewayProcess,
) -> None:
    # The fallback was announced (and made the session's provider) before the
    # failed one's last audio was counted: its 0.5 s went to LOCAL.
    before = await asyncio.to_thread(audio_seconds, gateway, "FAULTY")
    ws, _ = await open_session(
        gateway.url, provider="FAULTY", model="fail-after-audio", fallback=LOCAL
    )
    await send_audio(ws, silence(1.5), realtime=4.0)
    await ws.send(json.dumps({"type": "session.close"}))
    assert (await collect(ws))[-1]["type"] == "session.closed"
    took = await asyncio.to_thread(audio_seconds, gateway, "FAULTY") - before
    assert 0.5 <= took < 0.6, took  # it fails once 0.5 s arrived


def test_replay_buffer_keeps_only_audio_not_yet_final() -> None:
    buffer = ReplayBuffer(rate=1000, max_seconds=10)
    for i in range(5):  # five 100 ms chunks
        buffer.append(i * 100, np.full(100, i, np.int16))
    buffer.trim_before(250)  # a final ended at 250 ms: chunks 0 and 1 are done
    assert buffer.start_ms == 200
    assert [int(c[0]) for c in buffer] == [2, 3, 4]
    buffer.trim_before(299)  # chunk 2 still holds audio after the final
    assert len(buffer) == 3


def test_replay_buffer_is_bounded() -> None:
    buffer = ReplayBuffer(rate=1000, max_seconds=0.3)
    for i in range(5):
        buffer.append(i * 100, np.full(100, i, np.int16))
    assert [int(c[0]) for c in buffer] == [2, 3, 4]
    assert buffer.dropped_samples == 200
    assert buffer.lost_ms == 200  # no final yet: from where the buffer began
    buffer.trim_before(250)  # a final of what was dropped, and more
    assert buffer.lost_ms == 0
    later = ReplayBuffer(rate=1000, max_seconds=0.3)  # a reconfigured session's, 60 s in
    later.append(60_000, np.full(100, 1, np.int16))
    assert later.lost_ms == 0


async def test_the_fallback_s_events_come_after_the_session_updated_naming_it(
    gateway: GatewayProcess,
) -> None:
    # The replay's speech.started came before session.updated: a client that
    # tags transcripts with the last session.updated put them under the failed
    # provider.
    ws, _ = await open_session(
        gateway.url, provider="FAULTY", model="fail-after-3s", fallback=LOCAL
    )
    audio = np.concatenate([read_audio(SHARED_AUDIO / "goforward.raw"), silence(2.0)])
    await send_audio(ws, audio)  # as fast as it goes: the replay holds all its speech
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    kinds = [m["type"] for m in messages]
    after = kinds[kinds.index("error") :]
    assert after.index("session.updated") < after.index("speech.started"), after
    finals = [m for m in messages if m["type"] == "transcription.completed"]
    assert [normalize(f["text"]) for f in finals] == ["go forward ten meters"]
