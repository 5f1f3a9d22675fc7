"""Provider discovery and resolution with plugins that get the interface wrong.

Entry points come from a ``*.dist-info`` put on ``sys.path``, as an installed
package declares them; the ``plugins`` setting names classes directly.  One bad
plugin must cost its own provider only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ConfigError
from transcribe_gateway.protocol import messages as m
from transcribe_gateway.providers.local import LocalSTT
from transcribe_gateway.providers.registry import ProviderRegistry, ResolutionError
from transcribe_gateway.server.plan import plan_for

BROKEN = "tests.plugins.broken"


def install(monkeypatch: pytest.MonkeyPatch, root: Path, **entries: str) -> None:
    """Declare ``name = tests.plugins.broken:<Class>`` entry points, as an installed package."""
    dist = root / "broken_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    lines = [f"{name} = {BROKEN}:{klass}" for name, klass in entries.items()]
    (dist / "entry_points.txt").write_text(
        "[transcribe_gateway.providers]\n" + "\n".join(lines) + "\n"
    )
    monkeypatch.syspath_prepend(str(root))


def plugins(*classes: str) -> Settings:
    return Settings(plugins=[f"{BROKEN}:{klass}" for klass in classes])


class TestEntryPoints:
    def test_a_plugin_that_fails_to_initialise_is_left_out(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Its RuntimeError aborted discover(), and with it the server's start.
        install(monkeypatch, tmp_path, initbad="InitRaises", echo="Echo")
        registry = ProviderRegistry.discover(Settings())
        assert "INITBAD" not in registry.engines
        assert {"ECHO", "LOCAL", "DEEPGRAM"} <= set(registry.engines)
        assert "INITBAD_API_KEY is not set" in caplog.text

    def test_a_plugin_without_a_name_is_left_out(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        install(monkeypatch, tmp_path, noname="NoName", echo="Echo")
        registry = ProviderRegistry.discover(Settings())
        assert "NONAME" not in registry.engines and "ECHO" in registry.engines
        assert "no `provider` name" in caplog.text

    def test_a_plugin_claiming_local_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # It replaced the embedded engine, and every substituted session failed
        # (the default LOCAL model was not among its models: AssertionError, 1011).
        install(monkeypatch, tmp_path, local="ClaimsLocal")
        registry = ProviderRegistry.discover(Settings())
        assert type(registry.local) is LocalSTT
        assert "claims the name LOCAL" in caplog.text
        substituted = registry.resolve("DEEPGRAM", "nova-3", "en")
        assert substituted.stt is registry.local and substituted.requested_provider == "DEEPGRAM"

    def test_the_class_names_the_provider_in_upper_case(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Keyed by the entry point's name upper-cased, announced by the class's
        # "lowered": session.updated named a provider the server then refused.
        install(monkeypatch, tmp_path, other="LowerCase")
        registry = ProviderRegistry.discover(Settings())
        assert "OTHER" not in registry.engines
        assert registry.engines["LOWERED"].provider == "LOWERED"
        assert "served as LOWERED" in caplog.text  # the entry point's name differs
        resolution = registry.resolve("LOWERED", "echo", "en")
        session = m.SessionConfig(provider="LOWERED", model="echo")
        effective = plan_for(session, resolution, endpointing_ms=500).effective
        assert effective.provider == "LOWERED"
        registry.resolve(effective.provider, effective.model, "en")  # what it was told it has

    def test_a_plugin_replacing_a_builtin_is_logged(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Which one wins depends on the order packages are found in: the log says.
        install(monkeypatch, tmp_path, cartesia="Replacement")
        with caplog.at_level(logging.WARNING):
            ProviderRegistry.discover(Settings())
        assert "replaces" in caplog.text and "Replacement" in caplog.text


class TestPluginsSetting:
    @pytest.mark.parametrize(
        ("klass", "message"),
        [
            ("InitRaises", "failed to initialise: RuntimeError: INITBAD_API_KEY is not set"),
            ("NoName", "has no provider name"),
            ("ClaimsLocal", "claims the name LOCAL"),
        ],
    )
    def test_a_bad_plugin_is_a_one_line_configuration_error(self, klass: str, message: str) -> None:
        # They gave a traceback (RuntimeError, AttributeError) or, for LOCAL,
        # broke every substituted session.
        with pytest.raises(ConfigError) as caught:
            ProviderRegistry.discover(plugins(klass))
        assert str(caught.value).startswith("plugins: ")
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)

    def test_the_name_is_upper_cased(self) -> None:
        registry = ProviderRegistry.discover(plugins("LowerCase"))
        assert "lowered" not in registry.engines
        assert registry.resolve("LOWERED", "echo", "en").stt.provider == "LOWERED"

    def test_replacing_a_builtin_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING):
            registry = ProviderRegistry.discover(plugins("Replacement"))
        assert registry.engines["CARTESIA"].models()[0].name == "echo"
        assert "replaces" in caplog.text


class TestBrokenEngines:
    async def test_an_engine_that_fails_to_start_is_left_out(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Its exception aborted the server's start ("Application startup failed").
        registry = ProviderRegistry.discover(plugins("StartRaises", "Echo"))
        # No weights to load: LOCAL is not what this is about.
        registry.local.start = _nothing  # type: ignore[method-assign]
        registry.local.is_ready = lambda: True  # type: ignore[method-assign]
        await registry.start()
        assert "cannot warm up" in caplog.text
        assert registry.is_ready()  # the others are
        offer = registry.offer("STARTBAD")
        assert offer.faulty and "failed to start" in (offer.reason or "")
        with pytest.raises(ResolutionError) as refused:
            registry.resolve("STARTBAD", "echo", "en")
        assert refused.value.code == "provider_unavailable"
        assert refused.value.field == "session.provider"
        assert registry.resolve("ECHO", "echo", "en").stt.provider == "ECHO"

    def test_an_engine_whose_models_raise_is_unavailable(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Its RuntimeError failed every GET /v1/providers and closed the session 1011.
        registry = ProviderRegistry.discover(plugins("ModelsRaises"))
        for _ in range(2):
            with pytest.raises(ResolutionError) as refused:
                registry.resolve("MODELSBAD", "echo", "en")
            assert refused.value.code == "provider_unavailable"
            assert "failed to list its models" in refused.value.message
        assert caplog.text.count("Traceback") == 1  # once, not once a request
        offer = registry.offer("MODELSBAD")
        assert offer.faulty and offer.models == ()


class TestLanguages:
    @pytest.mark.parametrize("language", ["en-US", "en", "EN-gb", "de-DE", "de", "multi"])
    def test_declared_region_tags_match_by_language(self, language: str) -> None:
        # ModelInfo.languages holds BCP-47 tags: one declaring "en-US" refused "en-US".
        registry = ProviderRegistry.discover(plugins("Regional"))
        assert registry.resolve("REGIONAL", "echo", language).model.name == "echo"

    def test_another_language_is_still_refused(self) -> None:
        registry = ProviderRegistry.discover(plugins("Regional"))
        with pytest.raises(ResolutionError) as refused:
            registry.resolve("REGIONAL", "echo", "fr-FR")
        assert refused.value.field == "session.language"

    def test_a_provider_without_its_key_refuses_a_language_it_lacks(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Served by LOCAL instead (development), it took a language its own model
        # lacks: the request worked in development and failed in production.
        monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
        registry = ProviderRegistry.discover(Settings())
        with pytest.raises(ResolutionError) as refused:
            registry.resolve("DEEPGRAM", "flux-general-en", "de")
        assert refused.value.field == "session.language"
        assert "DEEPGRAM/flux-general-en supports language en" in refused.value.message
        substituted = registry.resolve("DEEPGRAM", "flux-general-en", "en")
        assert substituted.stt.provider == "LOCAL" and substituted.requested_provider == "DEEPGRAM"


async def _nothing() -> None:
    pass
