"""Raw protocol helpers for end-to-end tests (a plain websockets client, no SDK)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import TEST_KEYS
from transcribe_gateway.audio.decode import encode_alaw, encode_mulaw

KEY = TEST_KEYS[0]


async def connect(url: str, key: str | None = KEY, *, header: bool = True) -> ClientConnection:
    headers = {"Authorization": f"Bearer {key}"} if header and key is not None else None
    ws = await websockets.connect(url, additional_headers=headers, max_size=None)
    if not header and key is not None:
        await ws.send(json.dumps({"type": "auth", "token": key}))
    return ws


async def recv(ws: ClientConnection, timeout: float = 30.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    msg: dict[str, Any] = json.loads(raw)
    return msg


async def recv_type(ws: ClientConnection, kind: str, timeout: float = 30.0) -> dict[str, Any]:
    """Skip messages until one of ``kind`` arrives."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await recv(ws, max(0.01, deadline - time.monotonic()))
        if msg["type"] == kind:
            return msg


async def open_session(
    url: str, *, retry_busy: bool = False, **session: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect with the header, configure, return the socket and session.updated.

    With ``retry_busy``, a retryable ``provider_unavailable`` (the engine is busy)
    is retried for up to 30 s, as a client following the protocol would.
    """
    ws = await connect(url)
    created = await recv(ws)
    assert created["type"] == "session.created", created
    config = {"provider": "LOCAL", "model": "whisper-tiny.en", **session}
    deadline = time.monotonic() + 30
    while True:
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        updated = await recv(ws)
        busy = updated["type"] == "error" and updated["error"].get("retryable")
        if not (retry_busy and busy and time.monotonic() < deadline):
            break
        await asyncio.sleep(0.5)
    assert updated["type"] == "session.updated", updated
    return ws, updated


def encode(samples: np.ndarray, fmt: str) -> bytes:
    if fmt == "mulaw":
        return encode_mulaw(samples)
    if fmt == "alaw":
        return encode_alaw(samples)
    return samples.astype("<i2").tobytes()


async def send_audio(
    ws: ClientConnection,
    samples: np.ndarray,
    *,
    rate: int = 16000,
    fmt: str = "pcm16",
    chunk_ms: int = 20,
    realtime: float = 0.0,
) -> None:
    """Send samples in chunks; ``realtime`` = 1.0 paces at real time, 0 sends at once."""
    data = encode(samples, fmt)
    step = rate * chunk_ms // 1000 * (2 if fmt == "pcm16" else 1)
    start = time.monotonic()
    for n, i in enumerate(range(0, len(data), step)):
        payload = base64.b64encode(data[i : i + step]).decode()
        await ws.send(json.dumps({"type": "audio.append", "audio": payload}))
        if realtime:
            delay = start + (n + 1) * chunk_ms / 1000 / realtime - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def collect(ws: ClientConnection, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every message until the server closes the socket."""
    out: list[dict[str, Any]] = []

    async def run() -> None:
        async for raw in ws:
            out.append(json.loads(raw))

    await asyncio.wait_for(run(), timeout)
    return out


def finals(messages: list[dict[str, Any]]) -> str:
    return " ".join(m["text"] for m in messages if m["type"] == "transcription.completed")


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)
