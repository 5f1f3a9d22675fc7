"""The ``/ws`` transport (picows under uvicorn) and the connection's two audio paths.

Audio reaches an engine either at once (``push_audio_nowait``, no task) or,
when the engine pushes back, through a work task while later messages wait in
order.  The CHECKSUM plugin hashes what it is given, so a test can tell that
every sample arrived, once, in order, whichever path each chunk took.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from picows import WSListener, WSMsgType, WSTransport, ws_connect
from websockets.asyncio.client import ClientConnection

from tests.conftest import TEST_KEYS, GatewayProcess
from tests.server.wsutil import collect, connect, open_session, recv, send_audio, silence

MAX_MESSAGE = 4096  # the smallest max_message_bytes: frames over 4x it close 1009


@pytest.fixture(scope="module")
def server() -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        "transport",
        env={
            "TRANSCRIBE_PLUGINS": "tests.plugins.checksum:ChecksumSTT",
            "TRANSCRIBE_MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
            "TRANSCRIBE_MAX_CHUNK_BYTES": "2048",
            "TRANSCRIBE_WS_READ_AHEAD": "4",
        },
    )
    yield process
    process.stop()


def audio_chunks(count: int, samples: int = 320) -> tuple[list[str], int, str]:
    """``count`` audio.append messages of noise, the total samples and their hash."""
    signal = np.random.default_rng(7).integers(-3000, 3000, count * samples, dtype=np.int16)
    pcm = signal.astype("<i2").tobytes()
    step = samples * 2
    messages = [
        json.dumps({"type": "audio.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})
        for i in range(0, len(pcm), step)
    ]
    return messages, len(signal), hashlib.sha256(pcm).hexdigest()[:16]


def rss_mib(server: GatewayProcess) -> float:
    """The server process's resident memory."""
    with open(f"/proc/{server.proc.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class TestAudioPaths:
    @pytest.mark.parametrize("model", ["fast", "mixed", "slow"])
    async def test_every_chunk_reaches_the_engine_once_and_in_order(
        self, server: GatewayProcess, model: str
    ) -> None:
        messages, samples, digest = audio_chunks(300)
        ws, updated = await open_session(server.url, provider="CHECKSUM", model=model)
        assert updated["session"]["provider"] == "CHECKSUM"
        # Sent without waiting: with a slow engine the messages pile up far past
        # ws_read_ahead (4), so the server stops reading and resumes.
        for message in messages:
            await ws.send(message)
        await ws.send(json.dumps({"type": "session.close"}))
        received = await collect(ws, 60)
        finals = [m for m in received if m["type"] == "transcription.completed"]
        assert [f["text"] for f in finals] == [f"{samples} {digest}"], received
        assert received[-1]["type"] == "session.closed"
        assert received[-1]["usage"]["audio_seconds"] == pytest.approx(samples / 16000, abs=1e-3)
        assert not [m for m in received if m["type"] == "error"], received
        assert ws.close_code == 1000

    async def test_messages_sent_before_the_session_answers_keep_their_order(
        self, server: GatewayProcess
    ) -> None:
        # Auth, configuration and audio in one burst: the first two wait on the
        # key store and the engine, and the audio must queue behind them.
        messages, samples, digest = audio_chunks(50)
        ws = await websockets.connect(server.url)
        burst = [
            json.dumps({"type": "auth", "token": TEST_KEYS[0]}),
            json.dumps(
                {"type": "session.update", "session": {"provider": "CHECKSUM", "model": "fast"}}
            ),
            *messages,
            json.dumps({"type": "session.close"}),
        ]
        for message in burst:
            await ws.send(message)
        received = await collect(ws, 60)
        kinds = [m["type"] for m in received]
        assert kinds[:2] == ["session.created", "session.updated"], received
        finals = [m["text"] for m in received if m["type"] == "transcription.completed"]
        assert finals == [f"{samples} {digest}"]
        assert kinds[-1] == "session.closed"

    @staticmethod
    async def held_last(server: GatewayProcess, last: str) -> tuple[ClientConnection, str]:
        """Send ``last`` behind 50 chunks a slow engine is still taking: it waits in
        the inbox, and nothing comes after it.  Returns the socket and the final due."""
        messages, samples, digest = audio_chunks(50)
        ws, _ = await open_session(server.url, provider="CHECKSUM", model="slow")
        for message in [*messages, last]:
            await ws.send(message)
        return ws, f"{samples} {digest}"

    async def test_a_held_message_that_ends_the_session_closes_it(
        self, server: GatewayProcess
    ) -> None:
        # Nothing later comes to write the close frame the oversized message causes
        # (it once waited for the next message, and the session stayed open,
        # already failed, past its idle timeout).
        too_big = json.dumps({"type": "audio.append", "audio": "A" * (2 * MAX_MESSAGE)})
        ws, _ = await self.held_last(server, too_big)
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await recv(ws, 20)
        assert ws.close_code == 1008
        assert ws.close_reason == "message too big"

    async def test_a_held_malformed_message_is_answered_without_waiting_for_another(
        self, server: GatewayProcess
    ) -> None:
        ws, final = await self.held_last(server, "{not json")
        error = await recv(ws, 20)  # no later message: the error alone must be sent
        assert error["type"] == "error" and error["error"]["code"] == "invalid_message", error
        await ws.send(json.dumps({"type": "session.close"}))
        received = await collect(ws, 20)
        assert [m["text"] for m in received if m["type"] == "transcription.completed"] == [final]
        assert received[-1]["reason"] == "client_close", received  # not idle (3 s)


class TestFraming:
    async def test_fragmented_messages_are_joined(self, server: GatewayProcess) -> None:
        messages, samples, digest = audio_chunks(5)
        ws = await connect(server.url)
        assert (await recv(ws))["type"] == "session.created"
        update = json.dumps(
            {"type": "session.update", "session": {"provider": "CHECKSUM", "model": "fast"}}
        )
        await ws.send([update[:10], update[10:25], update[25:]])  # three frames, one message
        assert (await recv(ws))["type"] == "session.updated"
        for message in messages:
            await ws.send([message[:100], message[100:]])
        await ws.send(json.dumps({"type": "session.close"}))
        received = await collect(ws, 30)
        finals = [m["text"] for m in received if m["type"] == "transcription.completed"]
        assert finals == [f"{samples} {digest}"]

    async def test_fragmented_message_over_the_frame_limit_closes_1009(
        self, server: GatewayProcess
    ) -> None:
        ws, _ = await open_session(server.url, provider="CHECKSUM", model="fast")
        piece = "A" * MAX_MESSAGE
        with pytest.raises(websockets.ConnectionClosed):
            await ws.send([piece] * 5)  # 5x the message limit, in 4 KiB frames
            await recv(ws, 10)
        assert ws.close_code == 1009
        await self._server_goes_on(server)

    @pytest.mark.parametrize(
        ("frames", "code"),
        [
            ([(WSMsgType.TEXT, b'{"type": "auth", "token": "\xff\xfe"}', True)], 1007),
            ([(WSMsgType.CONTINUATION, b"{}", True)], 1002),
            ([(WSMsgType.TEXT, b"{", False), (WSMsgType.TEXT, b"}", True)], 1002),
        ],
        ids=["invalid-utf8", "continuation-without-start", "new-message-inside-fragmented"],
    )
    async def test_frames_against_rfc6455_close_the_connection(
        self, server: GatewayProcess, frames: list[tuple[WSMsgType, bytes, bool]], code: int
    ) -> None:
        # websockets will not send such frames; picows' client sends raw ones.
        closes: list[Any] = []

        class Client(WSListener):  # type: ignore[misc]
            def on_ws_connected(self, transport: WSTransport) -> None:
                for kind, payload, fin in frames:
                    transport.send(kind, payload, fin=fin)

            def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
                if frame.msg_type == WSMsgType.CLOSE:
                    closes.append(frame.get_close_code())
                    transport.disconnect()

        transport, _ = await ws_connect(Client, server.url)
        await asyncio.wait_for(transport.wait_disconnected(), 10)
        assert closes == [code]
        await self._server_goes_on(server)

    async def test_empty_fragments_take_no_memory(self, server: GatewayProcess) -> None:
        # The fragment limit counted bytes, but every frame was kept: a client (not
        # even authenticated) sending empty continuation frames grew the server's
        # memory by 8 bytes for each 6 on the wire, without bound.
        frames, sent = 16_000_000, asyncio.Event()

        class Client(WSListener):  # type: ignore[misc]
            def on_ws_connected(self, transport: WSTransport) -> None:
                transport.send(WSMsgType.TEXT, b"{", fin=False)
                for _ in range(frames):
                    transport.send(WSMsgType.CONTINUATION, b"", fin=False)
                sent.set()

        before = rss_mib(server)
        transport, _ = await ws_connect(Client, server.url)
        await asyncio.wait_for(sent.wait(), 60)
        for _ in range(600):  # until the server read them all (30 s at most)
            if not transport.underlying_transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        # Growth that does not depend on the frame count: the socket's buffers, the
        # earlier tests' sessions. Keeping each frame grew it by 37 MiB for 8 million.
        grown = rss_mib(server) - before
        transport.disconnect()
        assert grown < 30, f"{grown:.1f} MiB for {frames} empty frames"
        await self._server_goes_on(server)

    async def test_other_paths_are_not_websockets(self, server: GatewayProcess) -> None:
        with pytest.raises(websockets.InvalidStatus) as caught:
            await websockets.connect(server.url.replace("/ws", "/elsewhere"))
        assert caught.value.response.status_code == 404
        # Plain HTTP on the same port still reaches the app.
        assert server.health()["status"] == "ok"

    async def test_client_close_ends_the_session(self, server: GatewayProcess) -> None:
        ws, _ = await open_session(server.url, provider="CHECKSUM", model="fast")
        await ws.close(1000)
        assert ws.close_code == 1000
        for _ in range(50):
            if server.health()["sessions"] == 0:
                break
            await asyncio.sleep(0.1)
        assert server.health()["sessions"] == 0

    @staticmethod
    async def _server_goes_on(server: GatewayProcess) -> None:
        messages, samples, digest = audio_chunks(3)
        ws, _ = await open_session(server.url, provider="CHECKSUM", model="fast")
        for message in messages:
            await ws.send(message)
        await ws.send(json.dumps({"type": "session.close"}))
        received = await collect(ws, 30)
        assert [m["text"] for m in received if m["type"] == "transcription.completed"] == [
            f"{samples} {digest}"
        ]


async def test_a_shutdown_while_a_push_waits_keeps_every_accepted_chunk() -> None:
    # The sluggish model takes every chunk through the awaited path (50 ms each),
    # so when the shutdown's linger ends a push is under way. Its chunk is
    # counted in usage: it must reach the engine before the input ends.
    process = GatewayProcess(
        "transport-shutdown", env={"TRANSCRIBE_PLUGINS": "tests.plugins.checksum:ChecksumSTT"}
    )
    try:
        signal_ = np.random.default_rng(11).integers(-3000, 3000, 3000 * 320, dtype=np.int16)
        pcm = signal_.astype("<i2").tobytes()
        ws, _ = await open_session(process.url, provider="CHECKSUM", model="sluggish")

        async def send_all() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                for i in range(0, len(pcm), 640):
                    chunk = base64.b64encode(pcm[i : i + 640]).decode()
                    await ws.send(json.dumps({"type": "audio.append", "audio": chunk}))

        sender = asyncio.create_task(send_all())
        await asyncio.sleep(1.0)
        process.proc.send_signal(signal.SIGTERM)
        received = await collect(ws, 60)
        await sender
        accepted = round(received[-1]["usage"]["audio_seconds"] * 16000)
        assert 0 < accepted < len(signal_)
        finals = [m["text"] for m in received if m["type"] == "transcription.completed"]
        digest = hashlib.sha256(pcm[: accepted * 2]).hexdigest()[:16]
        assert finals == [f"{accepted} {digest}"], (finals, accepted)
    finally:
        assert process.stop() == 0


async def test_a_client_is_not_dropped_for_a_pong_held_up_by_the_servers_own_pause() -> None:
    # The server stops reading while an engine pushes back (count-hiccup holds a
    # push for 1.5 s). Its keepalive ping then went unanswered, the pong queued
    # behind the audio the client kept sending, and the session was closed 1001.
    process = GatewayProcess(
        "transport-ping",
        env={"TRANSCRIBE_WS_PING_INTERVAL_S": "0.3", "TRANSCRIBE_WS_PING_TIMEOUT_S": "0.3"},
    )
    try:
        ws, _ = await open_session(process.url, provider="FAULTY", model="count-hiccup")
        await send_audio(ws, silence(3.0), realtime=1.0)
        await ws.send(json.dumps({"type": "session.close"}))
        received = await collect(ws, 30)
        assert received and received[-1]["type"] == "session.closed", received[-3:]
        finals = [m["text"] for m in received if m["type"] == "transcription.completed"]
        assert finals == [str(3 * 16000)]
        # A client that truly stops answering is still found (nothing paused then).
        quiet = await connect(process.url)
        quiet.transport.pause_reading()  # reads nothing, so answers no ping
        await asyncio.sleep(2.0)
        quiet.transport.resume_reading()
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await recv(quiet, 10)
        assert quiet.close_code == 1001, quiet.close_reason
    finally:
        process.stop()
