"""``/metrics`` (Prometheus text) and ``/readyz``."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

from tests.conftest import SHARED_AUDIO, GatewayProcess
from tests.server.wsutil import open_session, recv_type, send_audio
from transcribe_gateway.audio.files import read_audio


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in the exposition text."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


class TestMetrics:
    async def test_metrics_after_a_transcribed_session(self, store_gateway: GatewayProcess) -> None:
        samples = read_audio(SHARED_AUDIO / "jfk.flac")
        ws, _ = await open_session(store_gateway.url, retry_busy=True)
        _, before = get(f"{store_gateway.http}/metrics")
        assert (sample(before, "transcribe_active_sessions") or 0) >= 1
        # Real time, so the engine has the time to send partials.
        await send_audio(ws, samples[: 16000 * 5], realtime=1.0)
        await ws.send(json.dumps({"type": "session.close"}))
        closed = await recv_type(ws, "session.closed", 60)
        audio = closed["usage"]["audio_seconds"]
        await ws.close()
        await asyncio.sleep(0.3)
        status, text = get(f"{store_gateway.http}/metrics")
        assert status == 200
        assert (sample(text, "transcribe_sessions_total", 'reason="client_close"') or 0) >= 1
        assert (
            sample(text, "transcribe_audio_seconds_total", 'provider="LOCAL"') or 0
        ) >= audio - 0.01
        assert (sample(text, "transcribe_time_to_first_partial_seconds_count") or 0) >= 1
        assert (sample(text, "transcribe_final_latency_seconds_count") or 0) >= 1
        # Finals arrive after their audio: a positive, bounded latency.
        total = sample(text, "transcribe_final_latency_seconds_sum") or 0
        assert 0 < total / (sample(text, "transcribe_final_latency_seconds_count") or 1) < 30
        assert sample(text, "transcribe_event_loop_lag_seconds") is not None
        for family in ("transcribe_provider_errors", "transcribe_fallbacks"):
            assert f"# TYPE {family}_total counter" in text or f"# TYPE {family} counter" in text
        assert sample(text, "transcribe_active_sessions") == 0


class TestReadyz:
    def test_ready_when_engines_loaded_and_store_reachable(
        self, store_gateway: GatewayProcess
    ) -> None:
        status, body = get(f"{store_gateway.http}/readyz")
        assert status == 200
        assert json.loads(body) == {
            "ready": True,
            "engines": True,
            "store": True,
            "draining": False,
        }
