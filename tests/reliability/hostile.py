"""Hostile clients, a healthy probe session and process figures, against a real server.

Used by tests/reliability/test_hostile_clients.py (a few hundred connections,
for CI) and by fuzz/hostile.py (thousands, by hand, printing the figures of
docs/reliability.md).  Every attack returns how many connections it tried and
how they ended, so both can report it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import TEST_KEYS
from tests.server.wsutil import collect, connect, finals, open_session, recv, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio

KEY = TEST_KEYS[0]
PROBE_TEXT = "go forward ten meters"


@dataclass(frozen=True)
class ProcStats:
    """A server process's resident memory and open file descriptors."""

    rss_kb: int
    fds: int


def proc_stats(pid: int) -> ProcStats:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return ProcStats(rss, len(os.listdir(f"/proc/{pid}/fd")))


@dataclass
class AttackResult:
    """What an attack did: connections tried and how the server ended them."""

    name: str
    connections: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def ended(self, outcome: str) -> None:
        self.outcomes[outcome] += 1


# ------------------------------------------------------------------ probe


class Probe:
    """A well-behaved client: one short utterance, timed from session.close to its final."""

    def __init__(self, url: str, audio_dir: Path) -> None:
        self.url = url
        self.audio = np.concatenate(
            [read_audio(audio_dir / "goforward.raw")[: int(2.35 * 16000)], silence(0.3)]
        )
        self.latencies: list[float] = []

    async def run_once(self) -> float:
        """One session; asserts every word came back; returns the latency in seconds."""
        ws, _ = await open_session(self.url, retry_busy=True)
        await send_audio(ws, self.audio)
        await ws.send(json.dumps({"type": "session.close"}))
        sent = time.monotonic()
        messages = await collect(ws, 60)
        done = [m for m in messages if m["type"] == "transcription.completed"]
        assert done, messages
        latency = time.monotonic() - sent
        assert normalize(finals(messages)) == PROBE_TEXT, messages
        assert messages[-1]["type"] == "session.closed", messages
        self.latencies.append(latency)
        return latency

    async def run_during(self, attack: Awaitable[Any], *, at_least: int = 1) -> Any:
        """Run probe sessions back to back while ``attack`` runs; returns its result."""
        task = asyncio.ensure_future(attack)
        runs = 0
        try:
            while not task.done() or runs < at_least:
                await self.run_once()
                runs += 1
            return await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


# ------------------------------------------------------------------ attacks


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client WebSocket frame (RFC 6455 5.2), masked as clients must."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


async def _closed_code(ws: ClientConnection, timeout: float) -> str:
    """Read until the server closes; the close code as a string (or why not)."""
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except TimeoutError:
        ws.transport.abort()
        return "still_open"
    except websockets.ConnectionClosed:
        pass
    return str(ws.close_code)


async def never_authenticate(url: str, count: int, timeout: float = 30.0) -> AttackResult:
    """Open ``count`` WebSockets that never send ``auth``: each must be closed 4001."""
    result = AttackResult("never_authenticate")
    started = time.monotonic()
    sockets = []
    for _ in range(count):
        sockets.append(await websockets.connect(url, open_timeout=10))
        result.connections += 1
    for code in await asyncio.gather(*(_closed_code(ws, timeout) for ws in sockets)):
        result.ended(code)
    result.seconds = time.monotonic() - started
    return result


async def dribble_frame(
    url: str, count: int, *, interval: float = 0.2, timeout: float = 30.0
) -> AttackResult:
    """Authenticate, then send one frame a byte at a time: the session must still end."""
    result = AttackResult("dribble_after_auth")
    started = time.monotonic()
    frame = _masked_frame(0x1, json.dumps({"type": "session.close"}).encode())

    async def one() -> str:
        ws = await connect(url)
        result.connections += 1
        assert (await recv(ws, 10))["type"] == "session.created"

        async def dribble() -> None:
            for i in range(len(frame) - 1):  # never the last byte
                ws.transport.write(frame[i : i + 1])
                await asyncio.sleep(interval)
            await asyncio.sleep(timeout)

        dribbler = asyncio.create_task(dribble())
        try:
            return await _closed_code(ws, timeout)
        finally:
            dribbler.cancel()
            with contextlib.suppress(BaseException):
                await dribbler
            ws.transport.abort()

    for code in await asyncio.gather(*(one() for _ in range(count))):
        result.ended(code)
    result.seconds = time.monotonic() - started
    return result


async def slow_http_upgrade(
    host: str, port: int, count: int, *, interval: float = 0.5, duration: float = 5.0
) -> AttackResult:
    """Raw TCP clients that send the upgrade request's headers a few bytes at a time."""
    result = AttackResult("slow_http_headers")
    started = time.monotonic()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
    ).encode()

    async def one() -> str:
        reader, writer = await asyncio.open_connection(host, port)
        result.connections += 1
        try:
            deadline = time.monotonic() + duration
            i = 0
            while time.monotonic() < deadline:
                writer.write(request[i : i + 3] if i < len(request) else b"X-Slow: 1\r\n")
                i += 3
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1), interval)
                except TimeoutError:
                    continue
                return "server_closed" if not data else "server_answered"
            return "held"
        except OSError:
            return "server_closed"
        finally:
            writer.transport.abort()

    for outcome in await asyncio.gather(*(one() for _ in range(count))):
        result.ended(outcome)
    result.seconds = time.monotonic() - started
    return result


async def flood_audio(url: str, count: int, *, seconds_of_audio: float = 60.0) -> AttackResult:
    """Sessions that send audio far faster than real time, then close: each must end 1000.

    The engine is the ``echo`` model of the FAULTY plugin (one final per 0.5 s
    of audio it really received), so the flood also proves no chunk was lost
    on the way through the gateway's backpressure.
    """
    result = AttackResult("audio_flood")
    started = time.monotonic()
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(int(seconds_of_audio * 16000)) * 300).astype(np.int16)

    async def one() -> str:
        ws, _ = await open_session(url, provider="FAULTY", model="echo")
        result.connections += 1
        reader = asyncio.create_task(collect(ws, 600))
        await send_audio(ws, noise, chunk_ms=100)
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await reader
        assert messages[-1]["type"] == "session.closed", messages[-3:]
        assert messages[-1]["usage"]["audio_seconds"] == pytest.approx(seconds_of_audio, abs=0.01)
        texts = [m["text"] for m in messages if m["type"] == "transcription.completed"]
        assert texts == [f"chunk {i}" for i in range(int(seconds_of_audio * 2))]
        return str(ws.close_code)

    for code in await asyncio.gather(*(one() for _ in range(count))):
        result.ended(code)
    result.seconds = time.monotonic() - started
    return result


async def oversized_frames(url: str, count: int, *, size: int) -> AttackResult:
    """Configured sessions that send one frame of ``size`` bytes: closed 1008 (or 1009)."""
    result = AttackResult(f"oversized_frame_{size}")
    started = time.monotonic()
    frame = json.dumps({"type": "audio.append", "audio": "A" * size})
    for _ in range(count):
        ws, _ = await open_session(url, retry_busy=True)
        result.connections += 1
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(frame)
        result.ended(await _closed_code(ws, 10))
    result.seconds = time.monotonic() - started
    return result


async def connect_cycles(url: str, count: int, *, concurrency: int = 8) -> AttackResult:
    """Connect and leave, ``count`` times, in every manner a client can leave."""
    result = AttackResult("connect_disconnect")
    started = time.monotonic()
    manners: list[Callable[[], Awaitable[str]]] = []

    async def clean_close() -> str:
        async with await connect(url) as ws:
            await recv(ws, 10)
        return "closed"

    async def abort_after_created() -> str:
        ws = await connect(url)
        await recv(ws, 10)
        ws.transport.abort()
        return "aborted"

    async def abort_before_auth() -> str:
        ws = await websockets.connect(url)
        ws.transport.abort()
        return "aborted_unauthenticated"

    async def wrong_key() -> str:
        ws = await connect(url, "wrong-key-" + os.urandom(4).hex())
        return await _closed_code(ws, 10)

    async def abort_mid_audio() -> str:
        ws, _ = await open_session(url, retry_busy=True)
        await send_audio(ws, np.zeros(3200, np.int16))
        ws.transport.abort()
        return "aborted_mid_audio"

    manners = [clean_close, abort_after_created, abort_before_auth, wrong_key, abort_mid_audio]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with semaphore:
            result.connections += 1
            return await manners[i % len(manners)]()

    for outcome in await asyncio.gather(*(one(i) for i in range(count))):
        result.ended(outcome)
    result.seconds = time.monotonic() - started
    return result


async def stop_reading(url: str, count: int, *, within_s: float = 60.0) -> AttackResult:
    """Sessions that keep sending but never read: the server must close them 1008.

    Each frame is a ``session.update`` with an unknown field, answered by an
    ``error`` of a few hundred bytes; unread, those fill the TCP buffers and
    then the server's bounded outgoing queue.  The client sends until the
    server closes the connection (or ``within_s`` passes).
    """
    result = AttackResult("stops_reading")
    started = time.monotonic()
    bad = json.dumps(
        {"type": "session.update", "session": {"provider": "P", "model": "M", "x" * 300: 1}}
    )

    async def one() -> str:
        ws, _ = await open_session(url, retry_busy=True)
        result.connections += 1
        deadline = time.monotonic() + within_s
        try:
            while time.monotonic() < deadline:
                # The server stops reading once it gave up on us: a send then blocks.
                await asyncio.wait_for(ws.send(bad), 2)
        except (websockets.ConnectionClosed, TimeoutError):
            pass
        # Only now read: what was queued, then the close frame (1008), which the
        # server can send once we drained it (within its 5 s close timeout).
        return await _closed_code(ws, 30)

    for code in await asyncio.gather(*(one() for _ in range(count))):
        result.ended(code)
    result.seconds = time.monotonic() - started
    return result


async def vanish_mid_utterance(url: str, count: int, audio: np.ndarray) -> AttackResult:
    """Sessions that stream speech at real time and vanish mid-word (no close frame)."""
    result = AttackResult("vanish_mid_utterance")
    started = time.monotonic()

    async def one() -> str:
        ws, _ = await open_session(url, retry_busy=True)
        result.connections += 1
        await send_audio(ws, audio, realtime=2.0)
        ws.transport.abort()
        return "vanished"

    for outcome in await asyncio.gather(*(one() for _ in range(count))):
        result.ended(outcome)
    result.seconds = time.monotonic() - started
    return result
