"""Every provider emulator, for the shared cloud test suite (tests/cloud/).

One line per provider model: the suite runs each of its tests against each.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.emulators.cartesia import CartesiaEmulator
from tests.emulators.deepgram import DeepgramEmulator
from tests.emulators.elevenlabs import ElevenLabsEmulator
from tests.emulators.openai import OpenAIEmulator
from tests.emulators.qwen import QwenEmulator
from tests.emulators.server import Emulator
from tests.emulators.soniox import SonioxEmulator


@dataclass(frozen=True)
class CloudCase:
    provider: str
    model: str
    emulator: type[Emulator]

    @property
    def id(self) -> str:
        return f"{self.provider}/{self.model}"


CASES: list[CloudCase] = [
    # Each adapter's author adds its line(s) here, e.g.
    # CloudCase("DEEPGRAM", "nova-3", DeepgramEmulator),
    CloudCase("SONIOX", "stt-rt-v4", SonioxEmulator),
    CloudCase("QWEN3", "qwen3-asr-flash-realtime", QwenEmulator),
    CloudCase("DEEPGRAM", "nova-3", DeepgramEmulator),
    CloudCase("DEEPGRAM", "flux-general-en", DeepgramEmulator),
    CloudCase("CARTESIA", "ink-whisper", CartesiaEmulator),
    CloudCase("ELEVENLABS", "scribe-v2-realtime", ElevenLabsEmulator),
    CloudCase("OPENAI", "gpt-4o-transcribe", OpenAIEmulator),
    CloudCase("OPENAI", "gpt-realtime", OpenAIEmulator),
]
