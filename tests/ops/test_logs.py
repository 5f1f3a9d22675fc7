"""Structured JSON logs: one object per line, session ids, no transcripts, no keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from tests.conftest import SHARED_AUDIO, TEST_KEYS, GatewayProcess
from tests.ops.conftest import OPS_ENV, create_key
from tests.server.wsutil import collect, connect, open_session, recv, send_audio
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.store.keys import hash_key


@pytest.fixture(scope="module")
def json_gateway(sqlite_env: dict[str, str]) -> Iterator[GatewayProcess]:
    server = GatewayProcess(
        "ops-json-logs", env={**OPS_ENV, **sqlite_env, "TRANSCRIBE_LOG_FORMAT": "json"}
    )
    yield server
    server.stop()


async def test_json_logs_carry_session_ids_and_no_transcript_or_key(
    json_gateway: GatewayProcess, sqlite_env: dict[str, str]
) -> None:
    stored = create_key(sqlite_env, "logged")
    ws, _ = await open_session(json_gateway.url, retry_busy=True)
    await send_audio(ws, read_audio(SHARED_AUDIO / "jfk.flac"), realtime=4.0)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    text = " ".join(m["text"] for m in messages if m["type"] == "transcription.completed")
    assert "country" in text.lower()
    async with await connect(json_gateway.url, stored) as other:
        session_id = (await recv(other, 5))["session"]["id"]
    await asyncio.sleep(0.5)
    lines = [json.loads(line) for line in json_gateway.logs().splitlines() if line.startswith("{")]
    assert lines, json_gateway.logs()
    ended = [e for e in lines if e["msg"] == "session ended"]
    assert {e["session_id"] for e in ended} >= {session_id}
    # Each call's own fields are kept beside the session's id: the key by its id.
    (created,) = [
        e for e in lines if e["msg"] == "session created" and e["session_id"] == session_id
    ]
    assert created["key"].startswith("key_")
    assert any(e.get("audio_seconds", 0) > 10 for e in ended)  # jfk's 11 s
    assert all(e["level"] in ("info", "warning", "error") for e in lines)  # nothing at debug
    raw = json_gateway.logs()
    for secret in (*TEST_KEYS, stored, hash_key(stored)):
        assert secret not in raw
    for word in ("country", "ask not"):
        assert word not in raw.lower()
