"""The network side of the provider emulators: a real WebSocket server and fault knobs.

Each emulator (one module per provider, written from that provider's public
docs) subclasses :class:`Emulator`: it checks the upgrade request (auth, path,
query), speaks the provider's messages in :meth:`Emulator.session`, and
records what the adapter sent so tests can assert on it.  The speech itself
is recognized for real (:mod:`tests.emulators.recognizer`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tests.emulators.recognizer import Recognizer


@dataclass
class Faults:
    """Ways the emulated provider misbehaves (all off by default)."""

    reject_auth: bool = False
    """Refuse every key (as if the configured one were revoked)."""
    drop_after_ms: float | None = None
    """Abort the TCP connection (no close frame) after this much audio."""
    stall_after_ms: float | None = None
    """Keep reading but never answer again after this much audio."""
    ignore_finalize: bool = False
    """Never answer the finalize / close-stream message."""
    connect_delay_s: float = 0.0
    """Hold the upgrade this long before answering it."""
    handshake: str = ""
    """After the upgrade: ``silent`` reads and never answers; ``garbled`` first
    sends a frame that is not JSON (where the adapter waits for a greeting)."""
    finish_after_ms: float | None = None
    """Say the stream is finished (and close) after this much audio (Soniox)."""
    close_on_finalize: int | None = None
    """Close with this code (1000, or 1001 "going away": a rolling restart) when
    the finalize / end-of-stream message arrives, before answering it."""
    realtime: bool = False
    """Hear audio no faster than it plays (a provider transcribing in real
    time): the reader takes the next message only once the audio before it has
    played, so what a client sends faster (a file) waits in the network."""


@dataclass
class Record:
    """One connection as the emulator saw it."""

    path: str
    query: dict[str, list[str]]
    headers: Headers
    text: list[dict[str, Any]] = field(default_factory=list)
    """Every JSON text message received, parsed."""
    binary_frames: int = 0
    audio_ms: float = 0.0
    keepalives: int = 0
    finalized: bool = False
    closed_by_client: bool = False
    stalled: bool = False
    heard_until: float = 0.0
    """``time.monotonic()`` when the audio received so far has played (``realtime``)."""
    ended: bool = False
    """The connection is over (either side closed it, or it broke)."""

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


class Emulator(abc.ABC):
    """A provider on a real port of 127.0.0.1."""

    api_key = "emulator-provider-key"
    path: ClassVar[str | None] = None
    """The one upgrade path served (others get HTTP 404); ``None``: any."""
    auth_in_session: ClassVar[bool] = False
    """The provider accepts any upgrade and refuses a bad key inside the
    session, so :meth:`session` checks :meth:`authorized` itself."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.records: list[Record] = []
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- provider specifics ------------------------------------------------

    @abc.abstractmethod
    def authorized(self, request: Request) -> bool:
        """Whether the upgrade request carries the right credentials."""

    def refuse(self, request: Request) -> Response:
        """The provider's answer to bad credentials (HTTP 401 by default)."""
        return Response(HTTPStatus.UNAUTHORIZED, "Unauthorized", Headers(), b"Unauthorized")

    @abc.abstractmethod
    async def session(self, ws: ServerConnection, record: Record) -> None:
        """Serve one connection the way the provider does."""

    # -- shared machinery ------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def __aenter__(self) -> Self:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._check,
            max_size=2**24,
            # A provider buffers what it receives, so it answers pings while it
            # works through the audio (``realtime``) instead of pausing the socket.
            max_queue=None,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.path is not None and urlsplit(request.path).path != self.path:
            return Response(HTTPStatus.NOT_FOUND, "Not Found", Headers(), b"Not Found")
        if self.faults.connect_delay_s:
            await asyncio.sleep(self.faults.connect_delay_s)
        if self.auth_in_session:
            return None
        if self.faults.reject_auth or not self.authorized(request):
            return self.refuse(request)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        parts = urlsplit(ws.request.path)
        record = Record(parts.path, parse_qs(parts.query), ws.request.headers)
        self.records.append(record)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.faults.handshake == "silent":
                async for _ in ws:  # the upgrade was answered; nothing else ever is
                    pass
            else:
                if self.faults.handshake == "garbled":
                    await ws.send("{not json")
                await self.session(ws, record)
        except Exception:  # the adapter went away, or a test cut it off
            pass
        finally:
            record.ended = True
            self._tasks.discard(task)

    @staticmethod
    async def converse(
        read: Coroutine[Any, Any, None], answer: Coroutine[Any, Any, None], recognizer: Recognizer
    ) -> None:
        """Read what the adapter sends while answering it; both end with the connection."""
        answers = asyncio.create_task(answer)
        try:
            await read
        finally:
            answers.cancel()
            recognizer.close()

    def audio(
        self, ws: ServerConnection, record: Record, recognizer: Recognizer, pcm16: bytes
    ) -> None:
        """Account for received audio, apply the faults, feed the recognizer."""
        ms = len(pcm16) * 500 / recognizer.rate
        record.audio_ms += ms
        if self.faults.realtime:
            record.heard_until = max(record.heard_until, time.monotonic()) + ms / 1000
        drop = self.faults.drop_after_ms
        if drop is not None and record.audio_ms >= drop:
            ws.transport.abort()  # a crash or a cut cable: no close frame
            return
        stall = self.faults.stall_after_ms
        if stall is not None and record.audio_ms >= stall:
            record.stalled = True
        recognizer.feed(pcm16)

    async def pace(self, record: Record) -> None:
        """With ``realtime``: wait until the audio received so far has played."""
        delay = record.heard_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def closed_on_finalize(self, ws: ServerConnection) -> bool:
        """Apply ``close_on_finalize`` to a finalize just received; True if closed."""
        code = self.faults.close_on_finalize
        if code is None:
            return False
        await ws.close(code, "going away" if code == 1001 else "")
        return True

    async def send(self, ws: ServerConnection, record: Record, payload: dict[str, Any]) -> None:
        """Send a JSON message unless the emulator is stalled."""
        if record.stalled:
            return
        with contextlib.suppress(Exception):
            await ws.send(json.dumps(payload))
