"""Auth as a security boundary: nothing before auth, constant-time keys, clean logs, tokens.

The "no provider is contacted" tests use the Deepgram emulator of
tests/emulators/ as the provider, counting every connection attempt, so a
gateway that opened a provider stream (or merely dialled it) before auth fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from tests.conftest import ROOT, SHARED_AUDIO, TEST_KEYS, GatewayProcess
from tests.emulators.deepgram import DeepgramEmulator
from tests.server.wsutil import collect, connect, recv, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.server.auth import KeyChecker

KEY = TEST_KEYS[0]
DEEPGRAM = {"provider": "DEEPGRAM", "model": "nova-3"}


class CountingDeepgram(DeepgramEmulator):
    """The Deepgram emulator, counting every upgrade attempt (even refused ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.attempts += 1
        return await super()._check(connection, request)


@dataclass
class World:
    gateway: GatewayProcess
    deepgram: CountingDeepgram

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the gateway's /metrics (0 when absent)."""
        with urllib.request.urlopen(f"{self.gateway.http}/metrics", timeout=5) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        head = f"{name}{{{want}}}" if want else name
        for line in text.splitlines():
            if line.startswith(head + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
async def world() -> AsyncIterator[World]:
    async with CountingDeepgram() as deepgram:
        env = {
            "DEEPGRAM_API_KEY": deepgram.api_key,
            "DEEPGRAM_BASE_URL": deepgram.url,
            "TRANSCRIBE_IDLE_TIMEOUT_S": "10",
        }
        gateway = await asyncio.to_thread(GatewayProcess, "auth-security", env)
        try:
            yield World(gateway, deepgram)
        finally:
            await asyncio.to_thread(gateway.stop)


def pipelined(*frames: dict[str, Any]) -> list[str]:
    return [json.dumps(f) for f in frames]


AUDIO = {"type": "audio.append", "audio": "AAAA" * 160}
UPDATE = {"type": "session.update", "session": DEEPGRAM}


async def closed_code(ws: websockets.ClientConnection) -> int | None:
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await recv(ws, 10)
    return ws.close_code


class TestNothingBeforeAuth:
    @pytest.mark.parametrize(
        ("header", "frames"),
        [
            (None, pipelined(UPDATE, *[AUDIO] * 20, {"type": "auth", "token": KEY})),
            (None, pipelined({"type": "auth", "token": "wrong-key"}, UPDATE, *[AUDIO] * 20)),
            ("wrong-key", pipelined(UPDATE, *[AUDIO] * 20)),
            (None, pipelined(AUDIO, UPDATE)),
        ],
        ids=["frames-before-auth", "wrong-auth-message", "wrong-header", "audio-first"],
    )
    async def test_server_contacts_no_provider_and_decodes_nothing_before_auth(
        self, world: World, header: str | None, frames: list[str]
    ) -> None:
        attempts = world.deepgram.attempts
        audio_seconds = world.metric("transcribe_audio_seconds_total", provider="DEEPGRAM")
        streams = world.gateway.health()["streams"]["LOCAL"]
        ws = await (
            connect(world.gateway.url, header) if header else websockets.connect(world.gateway.url)
        )
        # All in flight before the server could answer, as far as the server lets
        # them: a refused header may be closed 4001 while the burst is still going.
        with contextlib.suppress(websockets.ConnectionClosed):
            for frame in frames:
                await ws.send(frame)
        assert await closed_code(ws) == 4001
        await asyncio.sleep(0.3)  # a provider dial, had there been one, has begun by now
        assert world.deepgram.attempts == attempts
        assert world.metric("transcribe_audio_seconds_total", provider="DEEPGRAM") == audio_seconds
        assert world.gateway.health()["streams"]["LOCAL"] == streams

    async def test_the_same_frames_after_auth_do_reach_the_provider(self, world: World) -> None:
        """Control: the probes above can see a provider contact and metered audio."""
        attempts = world.deepgram.attempts
        audio_seconds = world.metric("transcribe_audio_seconds_total", provider="DEEPGRAM")
        ws = await websockets.connect(world.gateway.url)
        for frame in pipelined({"type": "auth", "token": KEY}, UPDATE, *[AUDIO] * 20):
            await ws.send(frame)
        assert (await recv(ws))["type"] == "session.created"
        updated = await recv(ws)
        assert updated["type"] == "session.updated", updated
        await ws.send(json.dumps({"type": "session.close"}))
        await collect(ws, 30)
        assert world.deepgram.attempts == attempts + 1
        metered = world.metric("transcribe_audio_seconds_total", provider="DEEPGRAM")
        assert metered - audio_seconds == pytest.approx(20 * 480 / 2 / 16000, abs=0.01)


class TestKeyComparisonTiming:
    """``KeyChecker.verify`` takes the same time whatever part of the key matches."""

    @staticmethod
    def median_ratio(fn: Callable[[str], object], a: str, b: str) -> float:
        """Median time of ``fn(a)`` over median time of ``fn(b)``, interleaved batches."""
        times: dict[str, list[int]] = {a: [], b: []}
        order = [a, b]
        for _ in range(300):
            random.shuffle(order)
            for arg in order:
                started = time.perf_counter_ns()
                for _ in range(20):
                    fn(arg)
                times[arg].append(time.perf_counter_ns() - started)
        return statistics.median(times[a]) / statistics.median(times[b])

    @staticmethod
    def keys(length: int = 4096) -> tuple[str, str, str]:
        """The key, a guess right but for its last char, and one wrong from its first."""
        key = os.urandom(length // 2).hex()
        flip = {"0": "1"}.get
        right_prefix = key[:-1] + (flip(key[-1]) or "0")
        wrong_prefix = (flip(key[0]) or "0") + key[1:]
        return key, right_prefix, wrong_prefix

    def test_verify_time_does_not_depend_on_the_matching_prefix(self) -> None:
        key, right_prefix, wrong_prefix = self.keys()
        checker = KeyChecker([key, os.urandom(2048).hex()])
        assert checker.verify(key) and not checker.verify(right_prefix)
        # Retried: a noisy neighbour can skew one run, but not three in a row.
        ratios = []
        for _ in range(3):
            ratios.append(self.median_ratio(checker.verify, right_prefix, wrong_prefix))
            if 0.8 < ratios[-1] < 1.25:
                break
        assert 0.8 < ratios[-1] < 1.25, ratios
        match = self.median_ratio(checker.verify, key, wrong_prefix)
        assert 0.7 < match < 1.4, match  # no early exit on a match either

    def test_the_timing_test_detects_an_early_exit_comparison(self) -> None:
        """Control: the same measurement flags a comparison that stops at the first difference."""
        key, right_prefix, wrong_prefix = self.keys()

        def leaky(presented: str) -> bool:
            for x, y in zip(presented, key, strict=False):
                if x != y:
                    return False
            return len(presented) == len(key)

        assert self.median_ratio(leaky, right_prefix, wrong_prefix) > 3


async def post_token(gateway: GatewayProcess, key: str, ttl_s: int | None = None) -> str:
    def call() -> str:
        body = json.dumps({} if ttl_s is None else {"ttl_s": ttl_s}).encode()
        request = urllib.request.Request(
            f"{gateway.http}/v1/tokens",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            token: str = json.loads(r.read())["token"]
            return token

    return await asyncio.to_thread(call)


def keys_cli(gateway: GatewayProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "transcribe_gateway", "keys", *args],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TRANSCRIBE_STORE_PATH": str(gateway.store_path),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def auth_with(url: str, token: str) -> tuple[str, int | None]:
    """Send ``token`` in the auth message: ``created`` or the close code."""
    ws = await connect(url, token, header=False)
    try:
        first = await recv(ws, 10)
    except websockets.ConnectionClosed:
        return "closed", ws.close_code
    await ws.close()
    return first["type"], None


class TestTokens:
    async def test_token_opens_one_session_and_never_a_second(self, world: World) -> None:
        token = await post_token(world.gateway, KEY)
        assert await auth_with(world.gateway.url, token) == ("session.created", None)
        assert await auth_with(world.gateway.url, token) == ("closed", 4001)

    async def test_token_raced_by_two_clients_opens_exactly_one_session(self, world: World) -> None:
        token = await post_token(world.gateway, KEY)
        results = await asyncio.gather(*(auth_with(world.gateway.url, token) for _ in range(5)))
        assert sorted(results, key=str) == sorted(
            [("session.created", None)] + [("closed", 4001)] * 4, key=str
        )

    async def test_expired_token_is_refused(self, world: World) -> None:
        token = await post_token(world.gateway, KEY, ttl_s=1)
        await asyncio.sleep(2.1)
        assert await auth_with(world.gateway.url, token) == ("closed", 4001)

    async def test_token_of_a_revoked_key_is_refused(self, world: World) -> None:
        key = keys_cli(world.gateway, "create", "to-revoke")
        spare = await post_token(world.gateway, key)
        token = await post_token(world.gateway, key)
        assert await auth_with(world.gateway.url, spare) == ("session.created", None)
        keys_cli(world.gateway, "revoke", "to-revoke")
        assert await auth_with(world.gateway.url, token) == ("closed", 4001)

    @pytest.mark.parametrize("tamper", ["signature", "payload", "non-ascii", "truncated"])
    async def test_forged_token_is_refused_with_4001(self, world: World, tamper: str) -> None:
        token = await post_token(world.gateway, KEY)
        body, _, signature = token.rpartition(".")
        forged = {
            "signature": f"{body}.{signature[::-1]}",
            "payload": f"{body[:-1]}{'B' if body.endswith('A') else 'A'}.{signature}",
            "non-ascii": f"{body}.{signature[:-1]}é",
            "truncated": body,
        }[tamper]
        assert await auth_with(world.gateway.url, forged) == ("closed", 4001)
        assert "key check failed" not in world.gateway.logs()  # refused, not an internal error


class TestSecretsStayOutOfLogs:
    async def test_keys_tokens_and_transcripts_never_reach_the_default_log(
        self, world: World
    ) -> None:
        gateway = world.gateway
        stored = keys_cli(gateway, "create", "log-check")
        token = await post_token(gateway, stored)
        speech = np.concatenate([read_audio(SHARED_AUDIO / "goforward.raw"), silence(0.5)])
        texts = []
        for credential, header in ((KEY, True), (TEST_KEYS[1], False), (token, False)):
            ws = await connect(gateway.url, credential, header=header)
            assert (await recv(ws))["type"] == "session.created"
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"provider": "LOCAL", "model": "whisper-tiny.en"},
                    }
                )
            )
            assert (await recv(ws))["type"] == "session.updated"
            await send_audio(ws, speech)
            await ws.send(json.dumps({"type": "session.close"}))
            messages = await collect(ws, 60)
            done = [m["text"] for m in messages if m["type"] == "transcription.completed"]
            assert normalize(" ".join(done)) == "go forward ten meters"
            texts += done
        for wrong in ("wrong-secret-key-0123", token, token[:-3] + "abc"):  # reused, forged
            assert await auth_with(gateway.url, wrong) == ("closed", 4001)
        logs = gateway.logs()
        assert "session created" in logs and "session ended" in logs  # the log is captured
        secrets = [*TEST_KEYS, stored, "wrong-secret-key-0123", world.deepgram.api_key]
        secrets += [token, token.rpartition(".")[0], token.rpartition(".")[2]]
        for secret in secrets:
            assert secret not in logs, f"a secret reached the log: {secret[:6]}..."
        for text in texts:
            assert text.strip() and text.strip() not in logs, text
        assert "forward ten" not in logs.lower() and "forward 10" not in logs.lower()
