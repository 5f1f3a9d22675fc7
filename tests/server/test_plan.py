"""From a session config to stream options and the effective config (server/plan.py)."""

from __future__ import annotations

import pytest

from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.protocol import messages as m
from transcribe_gateway.providers.base import ModelInfo
from transcribe_gateway.providers.registry import ProviderRegistry, Resolution
from transcribe_gateway.server.plan import plan_for, serving_instead


@pytest.fixture(scope="module")
def registry() -> ProviderRegistry:
    return ProviderRegistry.discover(Settings())


def config(**session: object) -> m.SessionConfig:
    return m.SessionConfig(**{"provider": "LOCAL", "model": "whisper-tiny.en", **session})  # type: ignore[arg-type]


def test_defaults_fill_what_the_client_left_out(registry: ProviderRegistry) -> None:
    resolution = registry.resolve("LOCAL", "whisper-tiny.en", "en")
    plan = plan_for(config(sample_rate=8000), resolution, endpointing_ms=700)
    assert plan.options.endpointing_ms == 700 and plan.effective.endpointing == 700
    assert (plan.options.vad_threshold, plan.options.vad_prefix_padding_ms) == (0.5, 300)
    assert plan.options.vad_min_speech_ms == 100
    # The engine gets its own rate; the client's is kept for the phone-line VAD.
    assert (plan.options.sample_rate, plan.options.source_rate) == (16000, 8000)
    assert plan.effective.sample_rate == 8000
    assert plan.effective.unsupported == [] and plan.effective.notice is None
    # session.updated says which VAD settings are in use, though none was sent.
    assert plan.effective.vad == m.VadConfig(0.5, 300, 100)
    partial = plan_for(config(vad=m.VadConfig(threshold=0.6)), resolution, endpointing_ms=700)
    assert partial.effective.vad == m.VadConfig(0.6, 300, 100)


def test_multi_is_served_in_the_language_of_a_model_that_cannot_detect(
    registry: ProviderRegistry,
) -> None:
    # PROTOCOL.md: "multi = auto-detect where the provider can" (it was refused).
    resolution = registry.resolve("LOCAL", "whisper-tiny.en", "multi")
    plan = plan_for(config(language="multi"), resolution, endpointing_ms=500)
    assert plan.options.language == plan.effective.language == "en"
    assert plan.effective.unsupported == ["language=multi (whisper-tiny.en transcribes en)"]


def test_what_the_client_set_wins_over_the_defaults(registry: ProviderRegistry) -> None:
    resolution = registry.resolve("LOCAL", "whisper-tiny.en", "en")
    vad = m.VadConfig(threshold=0.7, prefix_padding_ms=0, min_speech_ms=0)
    plan = plan_for(config(endpointing=250, vad=vad), resolution, endpointing_ms=700)
    assert plan.options.endpointing_ms == 250
    # Zero is a value, not "unset".
    assert (plan.options.vad_threshold, plan.options.vad_prefix_padding_ms) == (0.7, 0)
    assert plan.options.vad_min_speech_ms == 0
    assert plan.effective.vad == vad


def test_a_substitute_says_what_it_cannot_honour(registry: ProviderRegistry) -> None:
    # DEEPGRAM without a key is served by LOCAL's English-only default model.
    resolution = registry.resolve("DEEPGRAM", "nova-3", "de")
    plan = plan_for(
        config(provider="DEEPGRAM", model="nova-3", language="de-DE"),
        resolution,
        endpointing_ms=500,
    )
    assert plan.effective.provider == "LOCAL" and plan.effective.requested_provider == "DEEPGRAM"
    assert plan.options.language == plan.effective.language == "en"
    assert plan.effective.unsupported == ["language=de-DE (whisper-tiny.en transcribes en)"]
    assert "DEEPGRAM_API_KEY" in (plan.effective.notice or "")


def test_a_language_tag_is_read_whatever_its_case(registry: ProviderRegistry) -> None:
    # BCP 47 tags are case-insensitive: "EN-US" is English, for an English-only model.
    resolution = registry.resolve("LOCAL", "whisper-tiny.en", "EN-US")
    plan = plan_for(config(language="EN-US"), resolution, endpointing_ms=500)
    assert plan.effective.unsupported == []


def test_features_a_model_lacks_are_listed_not_refused(registry: ProviderRegistry) -> None:
    bare = ModelInfo("bare", supports_prompt=False, supports_vad=False, supports_endpointing=False)
    resolution = Resolution(registry.local, bare)
    session = config(model="bare", prompt="cards", vad=m.VadConfig(threshold=0.6), endpointing=300)
    plan = plan_for(session, resolution, endpointing_ms=500)
    assert plan.effective.unsupported == ["prompt", "vad", "endpointing"]
    assert plan.effective.vad is None  # the engine's own VAD: nothing of ours is in use
    # Nor its endpointing (Deepgram Flux ends turns on its own): not announced as in use.
    assert plan.effective.endpointing is None
    assert '"endpointing":' not in m.encode(m.SessionUpdated(session=plan.effective))
    assert (
        plan_for(config(model="bare"), resolution, endpointing_ms=500).effective.unsupported == []
    )


def test_an_ignored_prompt_is_not_announced_as_in_use(registry: ProviderRegistry) -> None:
    # Cartesia's ink-whisper announced "prompt" while listing it in `unsupported`.
    bare = ModelInfo("bare", supports_prompt=False)
    plan = plan_for(
        config(model="bare", prompt="cards"), Resolution(registry.local, bare), endpointing_ms=500
    )
    assert plan.effective.prompt is None and plan.effective.unsupported == ["prompt"]
    assert '"prompt":' not in m.encode(m.SessionUpdated(session=plan.effective))
    whisper = registry.resolve("LOCAL", "whisper-tiny.en", "en")
    assert plan_for(config(prompt="cards"), whisper, endpointing_ms=500).effective.prompt == "cards"


@pytest.mark.parametrize("language", ["en-US", "en", "EN-gb", "de-de"])
def test_region_tags_a_model_declares_match_by_language(
    registry: ProviderRegistry, language: str
) -> None:
    # ModelInfo.languages holds BCP-47 tags; a model declaring "en-US" had
    # "en-US" turned into "language=en-US (... transcribes en-US)".
    regional = ModelInfo("regional", languages=("en-US", "de-DE"))
    plan = plan_for(
        config(model="regional", language=language),
        Resolution(registry.local, regional),
        endpointing_ms=500,
    )
    assert plan.effective.unsupported == []
    assert plan.options.language == plan.effective.language == language
    other = plan_for(
        config(model="regional", language="fr"),
        Resolution(registry.local, regional),
        endpointing_ms=500,
    )
    assert other.effective.unsupported == ["language=fr (regional transcribes en-US)"]


def test_semantic_endpointing_is_for_models_that_can_judge_a_sentence(
    registry: ProviderRegistry,
) -> None:
    whisper = registry.resolve("LOCAL", "whisper-tiny.en", "en")
    plan = plan_for(config(endpointing_unfinished=1500), whisper, endpointing_ms=500)
    assert plan.options.endpointing_unfinished_ms == plan.effective.endpointing_unfinished == 1500
    assert plan.options.endpointing_ms == 500 and plan.effective.unsupported == []
    # Never sooner than a finished sentence: raised to the endpointing.
    plan = plan_for(
        config(endpointing=800, endpointing_unfinished=300), whisper, endpointing_ms=500
    )
    assert plan.options.endpointing_unfinished_ms == plan.effective.endpointing_unfinished == 800
    # Off unless asked for, and not announced then.
    plan = plan_for(config(), whisper, endpointing_ms=500)
    assert plan.options.endpointing_unfinished_ms is None
    assert "endpointing_unfinished" not in m.encode(m.SessionUpdated(session=plan.effective))
    # pocketsphinx writes no punctuation to judge by: listed, dropped.
    sphinx = registry.resolve("LOCAL", "pocketsphinx-en-us", "en")
    session = config(model="pocketsphinx-en-us", endpointing_unfinished=1500)
    plan = plan_for(session, sphinx, endpointing_ms=500)
    assert plan.options.endpointing_unfinished_ms is None
    assert plan.effective.endpointing_unfinished is None
    assert plan.effective.unsupported == ["endpointing_unfinished"]


def test_a_fallback_is_announced_in_place_of_the_provider_that_failed(
    registry: ProviderRegistry,
) -> None:
    fallback = plan_for(
        config(), registry.resolve("LOCAL", "whisper-tiny.en", "en"), endpointing_ms=500
    )
    failure = ProviderError("DEEPGRAM", "connection refused", retryable=True)
    plan = serving_instead(fallback, failure, config(provider="DEEPGRAM", model="nova-3"))
    assert plan.options is fallback.options
    assert (plan.effective.provider, plan.effective.model) == ("LOCAL", "whisper-tiny.en")
    assert (plan.effective.requested_provider, plan.effective.requested_model) == (
        "DEEPGRAM",
        "nova-3",
    )
    assert plan.effective.notice == (
        "DEEPGRAM failed (connection refused); this session is served by its "
        "fallback LOCAL/whisper-tiny.en"
    )


def test_a_fallback_for_a_substitute_names_what_the_client_asked_for(
    registry: ProviderRegistry,
) -> None:
    # DEEPGRAM (no key) was served by LOCAL, which failed; the fallback OPENAI (no
    # key either) is served by LOCAL too. The announcement read "requested LOCAL,
    # nova-3", a pair no client asked for, and dropped the fallback's substitution.
    asked = config(provider="DEEPGRAM", model="nova-3")
    fallback = plan_for(
        config(provider="OPENAI", model="gpt-4o-transcribe"),
        registry.resolve("OPENAI", "gpt-4o-transcribe", "en"),
        endpointing_ms=500,
    )
    plan = serving_instead(fallback, ProviderError("LOCAL", "at capacity"), asked)
    effective = plan.effective
    assert (effective.requested_provider, effective.requested_model) == ("DEEPGRAM", "nova-3")
    assert effective.notice is not None
    assert effective.notice.startswith(
        "LOCAL (serving DEEPGRAM/nova-3) failed (at capacity); this session is served by "
        "its fallback LOCAL/whisper-tiny.en (OPENAI is not available on this server"
    ), effective.notice
