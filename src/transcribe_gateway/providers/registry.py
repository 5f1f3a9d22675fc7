"""Which engine serves a ``session.update``: provider discovery and resolution.

Adapters are found through the ``transcribe_gateway.providers`` entry point
group (name = provider, value = an :class:`~transcribe_gateway.providers.base.STT`
subclass), so a third-party package adds an engine by declaring one entry
point.  :data:`CATALOG` lists the providers of the public Transcribe service,
so a request for one whose adapter or credentials are missing is told so
clearly: in the development profile it is served by LOCAL (and
``session.updated`` says so), with ``strict_providers`` (or in production) it is refused.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Final

from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ConfigError
from transcribe_gateway.protocol.messages import clip_echo
from transcribe_gateway.providers.base import STT, ModelInfo

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "transcribe_gateway.providers"

CATALOG: Final[dict[str, tuple[str, ...]]] = {
    "DEEPGRAM": ("nova-3", "flux-general-en"),
    "OPENAI": ("gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-realtime"),
    "CARTESIA": ("ink-whisper",),
    "ELEVENLABS": ("scribe-v2-realtime",),
    "SONIOX": ("stt-rt-v4",),
    "QWEN3": ("qwen3-asr-flash-realtime",),
}
"""Cloud providers and models of the public Transcribe API."""

CREDENTIAL_ENV: Final = {name: f"{name}_API_KEY" for name in CATALOG}


class ResolutionError(Exception):
    """The request cannot be served; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Resolution:
    """The engine that will serve a request, and why, when it is not the one asked for."""

    stt: STT
    model: ModelInfo
    requested_provider: str | None = None
    requested_model: str | None = None
    notice: str | None = None


def _import_plugin(spec: str) -> type[STT]:
    """Load ``module:Class``; a bad plugin is a configuration error, found at start."""
    module_name, _, attr = spec.partition(":")
    try:
        loaded = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"plugins: cannot load {spec!r}: {exc}") from exc
    if not (isinstance(loaded, type) and issubclass(loaded, STT)):
        raise ConfigError(f"plugins: {spec!r} is not an STT subclass")
    return loaded


class ProviderRegistry:
    """The server's engines, keyed by provider name."""

    def __init__(self, settings: Settings, engines: dict[str, STT]) -> None:
        self.settings = settings
        self.engines = engines

    @classmethod
    def discover(
        cls, settings: Settings, extra: dict[str, type[STT]] | None = None
    ) -> ProviderRegistry:
        """Instantiate every adapter registered in the entry point group (plus ``extra``)."""
        classes: dict[str, type[STT]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = ep.load()
            except Exception:
                log.exception("cannot load provider plugin", extra={"plugin": ep.name})
                continue
            if isinstance(loaded, type) and issubclass(loaded, STT):
                classes[ep.name.upper()] = loaded
        for spec in settings.plugins:
            klass = _import_plugin(spec)
            classes[klass.provider] = klass
        if "LOCAL" not in classes:  # running from a source tree without installed metadata
            from transcribe_gateway.providers.local import LocalSTT

            classes["LOCAL"] = LocalSTT
        classes.update(extra or {})
        return cls(settings, {name: klass(settings) for name, klass in classes.items()})

    @property
    def local(self) -> STT:
        return self.engines["LOCAL"]

    def known_providers(self) -> list[str]:
        return sorted(set(self.engines) | set(CATALOG))

    def resolve(self, provider: str, model: str, language: str) -> Resolution:
        """Pick the engine for ``provider``/``model``.

        Raises:
            ResolutionError: ``invalid_session_config`` (unknown provider, model or
                unsupported language) or ``provider_unavailable`` (strict mode).
        """
        stt = self.engines.get(provider)
        if stt is None and provider not in CATALOG:
            raise ResolutionError(
                "invalid_session_config",
                f"unknown provider {clip_echo(provider)!r}; this server offers "
                + ", ".join(self.known_providers()),
                "session.provider",
            )
        models = [m.name for m in stt.models()] if stt else list(CATALOG[provider])
        info = stt.find_model(model) if stt else None
        if info is None and model not in models:
            raise ResolutionError(
                "invalid_session_config",
                f"unknown model {clip_echo(model)!r} for {provider}; expected one of "
                f"{', '.join(models)}",
                "session.model",
            )
        reason = stt.unavailable_reason() if stt else self.missing_reason(provider)
        if stt is not None and info is not None and reason is None:
            # BCP 47 tags are case-insensitive ("EN-US"). "multi" asks for detection
            # where the engine can: elsewhere the model's language serves (plan_for).
            base = language.split("-")[0].lower()
            if info.languages is not None and base not in (*info.languages, "multi"):
                raise ResolutionError(
                    "invalid_session_config",
                    f"{provider}/{model} supports language {', '.join(info.languages)}, "
                    f"not {clip_echo(language)!r}",
                    "session.language",
                )
            return Resolution(stt, info)
        if self.settings.strict_providers or self.settings.profile == "production":
            raise ResolutionError(
                "provider_unavailable",
                f"{provider} is not available on this server: {reason}",
                "session.provider",
            )
        local = self.local
        fallback_name = self.settings.local.default_model
        fallback = local.find_model(fallback_name)
        assert fallback is not None, "the default LOCAL model is always offered"
        return Resolution(
            local,
            fallback,
            requested_provider=provider,
            requested_model=model,
            notice=(
                f"{provider} is not available on this server ({reason}); this session is "
                f"served by LOCAL/{fallback.name} instead (development profile). "
                "Start the server with --strict-providers to get an error instead."
            ),
        )

    def missing_reason(self, provider: str) -> str:
        """Why a catalog provider with no installed adapter cannot serve."""
        if self.settings.provider_setting(provider, "api_key"):
            return "no adapter for it is installed in this build"
        return f"{CREDENTIAL_ENV[provider]} is not set"

    async def start(self) -> None:
        for stt in self.engines.values():
            await stt.start()

    def is_ready(self) -> bool:
        return all(stt.is_ready() for stt in self.engines.values())

    async def aclose(self) -> None:
        for stt in self.engines.values():
            await stt.aclose()
