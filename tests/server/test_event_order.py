"""The protocol's order of an utterance's events holds whatever order an engine sends them in."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from tests.conftest import GatewayProcess
from tests.server.wsutil import collect, open_session, send_audio

UTTERANCE_EVENTS = (
    "speech.started",
    "transcription.partial",
    "transcription.completed",
    "speech.stopped",
)


@pytest.fixture(scope="module")
def server() -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        "event-order", env={"TRANSCRIBE_PLUGINS": "tests.plugins.misordered:MisorderedSTT"}
    )
    yield process
    process.stop()


async def test_events_out_of_order_reach_the_client_in_order(server: GatewayProcess) -> None:
    ws, _ = await open_session(server.url, provider="MISORDERED", model="scrambled")
    await send_audio(ws, np.zeros(8000, np.int16))
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)
    by_utterance: dict[str, list[tuple[str, str]]] = {}
    for msg in messages:
        if msg["type"] in UTTERANCE_EVENTS:
            by_utterance.setdefault(msg["utterance_id"], []).append(
                (msg["type"], msg.get("text", ""))
            )
    # Each utterance: started, partials, one completed, stopped; nothing after.
    for events in by_utterance.values():
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "speech.started" and kinds[-1] == "speech.stopped", by_utterance
        assert kinds.count("speech.stopped") == 1 and kinds.count("transcription.completed") <= 1
        if "transcription.completed" in kinds:
            assert kinds.index("transcription.completed") == len(kinds) - 2, by_utterance
    # No words lost: the second final and the final after its stop are utterances of their own.
    finals = [t for m in messages if m["type"] == "transcription.completed" for t in [m["text"]]]
    assert finals == ["one two", "three", "late"], by_utterance
    assert [m["error"]["code"] for m in messages if m["type"] == "error"] == ["provider_error"]
    assert messages[-1]["type"] == "session.closed"
