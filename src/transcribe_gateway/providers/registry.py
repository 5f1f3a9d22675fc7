"""Which engine serves a ``session.update``: provider discovery and resolution.

Adapters are found through the ``transcribe_gateway.providers`` entry point
group (value = an :class:`~transcribe_gateway.providers.base.STT` subclass) and
the ``plugins`` setting (``module:Class``), so a third-party package adds an
engine by declaring one entry point.  Either way the provider's name is the
class's ``provider``, upper-cased (an entry point's own name is only checked
against it): the name a session asks for is the one ``session.updated`` and
errors give back.  :data:`CATALOG` lists the providers of the public Transcribe service,
so a request for one whose adapter or credentials are missing is told so
clearly: in the development profile it is served by LOCAL (and
``session.updated`` says so), with ``strict_providers`` (or in production) it is refused.

One broken plugin does not take the server down: an entry point that cannot be
loaded or created is logged and left out; an engine whose ``start`` fails, or
that raises when asked for its models, is listed as unavailable with the reason
and its sessions get ``provider_unavailable``.  A bad ``plugins`` entry, which
the operator named, is a :class:`~transcribe_gateway.exceptions.ConfigError`.
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
from transcribe_gateway.providers.base import STT, ModelInfo, primary_subtag

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


def _one_line(exc: BaseException) -> str:
    """``exc`` for a one-line message (a plugin's text may span lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_plugin(spec: str) -> type[STT]:
    """Load ``module:Class``; a bad plugin is a configuration error, found at start."""
    module_name, _, attr = spec.partition(":")
    try:
        loaded = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        # Whatever the module raises on import (a SyntaxError, a RuntimeError for a
        # missing variable; a TypeError for a relative ``.mod``): the operator named
        # it, so one line naming the entry, not a traceback.
        raise ConfigError(f"plugins: cannot load {spec!r}: {_one_line(exc)}") from exc
    if not (isinstance(loaded, type) and issubclass(loaded, STT)):
        raise ConfigError(f"plugins: {spec!r} is not an STT subclass")
    return loaded


def provider_name(klass: type[STT]) -> str | None:
    """The name ``klass`` serves under: its ``provider``, upper-cased (``None``: it has none).

    Upper-cased because sessions, the catalog and ``<NAME>_API_KEY`` all spell
    providers so; the engine is renamed to match (:meth:`ProviderRegistry.discover`).
    """
    name = getattr(klass, "provider", None)  # STT only annotates it: a plugin may forget it
    if not isinstance(name, str) or not name.strip():
        return None
    return name.strip().upper()


def plugin_class(spec: str) -> tuple[str, type[STT]]:
    """Load one entry of the ``plugins`` setting: its provider name and class.

    Raises:
        ConfigError: it cannot be imported, is no STT subclass, has no
            ``provider`` or claims ``LOCAL``.
    """
    klass = _import_plugin(spec)
    name = provider_name(klass)
    if name is None:
        raise ConfigError(
            f"plugins: {spec!r} has no provider name (set the class attribute `provider`)"
        )
    if name == "LOCAL":
        raise ConfigError(
            f"plugins: {spec!r} claims the name LOCAL, which is the embedded engine's "
            "(LOCAL serves every substituted session); give it a name of its own"
        )
    return name, klass


def create_plugin(spec: str, klass: type[STT], settings: Settings) -> STT:
    """Create the engine of a ``plugins`` entry (``serve`` does, and ``config check``).

    Raises:
        ConfigError: its ``__init__`` raised (a missing key, a bad option).
    """
    try:
        return klass(settings)
    except Exception as exc:
        raise ConfigError(f"plugins: {spec!r} failed to initialise: {_one_line(exc)}") from exc


def check_plugins(settings: Settings, *, create: bool) -> None:
    """What :meth:`ProviderRegistry.discover` refuses in the ``plugins`` setting;
    with ``create``, each engine is created (and dropped) as ``serve`` creates it."""
    for spec in settings.plugins:
        _, klass = plugin_class(spec)
        if create:
            create_plugin(spec, klass, settings)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """An engine class found for a provider name, and where it came from (for logs)."""

    klass: type[STT]
    origin: str
    spec: str | None = None
    """Its ``plugins`` entry, if the operator named it there (its failures are
    configuration errors)."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What an installed engine offers now (``GET /v1/providers``, resolution)."""

    models: tuple[ModelInfo, ...]
    reason: str | None
    """Why it cannot serve now; ``None`` when it can."""
    faulty: bool = False
    """The reason is a fault of the engine (it failed to start or to answer), not a
    missing key: its sessions are refused, never served by a substitute."""


class ProviderRegistry:
    """The server's engines, keyed by provider name."""

    def __init__(self, settings: Settings, engines: dict[str, STT]) -> None:
        self.settings = settings
        self.engines = engines
        self.faults: dict[str, str] = {}
        """Engines left out since start (failed to start): provider -> reason."""
        self._answer_failed: set[str] = set()
        """Engines whose last call failed (logged once, with the traceback, until one works)."""

    @classmethod
    def discover(
        cls, settings: Settings, extra: dict[str, type[STT]] | None = None
    ) -> ProviderRegistry:
        """Instantiate every adapter registered in the entry point group, the
        ``plugins`` setting's (plus ``extra``, trusted: tests).

        Raises:
            ConfigError: a ``plugins`` entry is bad (:func:`plugin_class`,
                :func:`create_plugin`).  A bad entry point is logged and left out:
                it was installed, not asked for by name.
        """
        from transcribe_gateway.providers.local import LocalSTT

        classes: dict[str, _Candidate] = {}

        def add(name: str, candidate: _Candidate) -> None:
            replaced = classes.get(name)
            if replaced is not None and replaced.klass is not candidate.klass:
                log.warning(
                    "provider plugin %s replaces %s as %s",
                    candidate.origin,
                    replaced.origin,
                    name,
                    extra={"provider": name},
                )
            classes[name] = candidate

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            origin = f"entry point {ep.name} = {ep.value}"
            try:
                loaded = ep.load()
            except Exception:
                log.exception("cannot load provider plugin", extra={"plugin": ep.name})
                continue
            if not (isinstance(loaded, type) and issubclass(loaded, STT)):
                log.error("provider plugin %s is not an STT subclass; left out", origin)
                continue
            name = provider_name(loaded)
            if name is None:
                log.error("provider plugin %s has no `provider` name; left out", origin)
                continue
            if name != ep.name.upper():
                log.warning(
                    "provider plugin %s: the class's provider %r names it, not the entry "
                    "point; served as %s",
                    origin,
                    loaded.provider,
                    name,
                )
            if name == "LOCAL" and loaded is not LocalSTT:
                # The embedded engine serves every substituted session: another in
                # its place broke them all.
                log.error("provider plugin %s claims the name LOCAL; left out", origin)
                continue
            add(name, _Candidate(loaded, origin))
        for spec in settings.plugins:
            name, klass = plugin_class(spec)
            add(name, _Candidate(klass, f"plugins {spec!r}", spec))
        # Running from a source tree without installed metadata, LOCAL has no entry point.
        classes.setdefault("LOCAL", _Candidate(LocalSTT, "built in"))
        for name, klass in (extra or {}).items():
            classes[name] = _Candidate(klass, "extra")
        engines: dict[str, STT] = {}
        for name, candidate in classes.items():
            if candidate.spec is not None:
                stt = create_plugin(candidate.spec, candidate.klass, settings)
            elif name == "LOCAL":  # every substituted session needs it: its failure stops all
                stt = candidate.klass(settings)
            else:
                try:
                    stt = candidate.klass(settings)
                except Exception:
                    log.exception("cannot create provider plugin", extra={"plugin": name})
                    continue
            if stt.provider != name:
                # One name everywhere: session.updated, errors and logs say what a session
                # can ask for (a class's "myeng" is served, and named, as MYENG).
                stt.provider = name  # type: ignore[misc]
            engines[name] = stt
        return cls(settings, engines)

    @property
    def local(self) -> STT:
        return self.engines["LOCAL"]

    def known_providers(self) -> list[str]:
        return sorted(set(self.engines) | set(CATALOG))

    def offer(self, provider: str) -> Offer:
        """What the installed engine ``provider`` offers now.

        A plugin that raises when asked (its models, whether it can serve) is
        unavailable, with the reason, rather than failing the request that asked:
        ``GET /v1/providers`` lists everyone else, its sessions get
        ``provider_unavailable``.
        """
        stt = self.engines[provider]
        if (fault := self.faults.get(provider)) is not None:
            return Offer((), fault, faulty=True)
        try:
            models = tuple(stt.models())
        except Exception as exc:
            return Offer((), self._failed(provider, "list its models", exc), faulty=True)
        try:
            reason = stt.unavailable_reason()
        except Exception as exc:
            return Offer((), self._failed(provider, "say if it can serve", exc), faulty=True)
        self._answer_failed.discard(provider)
        return Offer(models, reason)

    def _failed(self, provider: str, what: str, exc: Exception) -> str:
        """Log a plugin's failure to answer (the traceback once, not once per
        request while it lasts); returns the reason to give, safe for the public."""
        if provider not in self._answer_failed:
            self._answer_failed.add(provider)
            log.error("provider %s failed to %s", provider, what, exc_info=exc)
        return f"its engine failed to {what} ({type(exc).__name__}; see the server log)"

    def resolve(self, provider: str, model: str, language: str) -> Resolution:
        """Pick the engine for ``provider``/``model``.

        Raises:
            ResolutionError: ``invalid_session_config`` (unknown provider, model or
                unsupported language) or ``provider_unavailable`` (strict mode, or
                an engine that failed to start or to answer).
        """
        stt = self.engines.get(provider)
        if stt is None and provider not in CATALOG:
            raise ResolutionError(
                "invalid_session_config",
                f"unknown provider {clip_echo(provider)!r}; this server offers "
                + ", ".join(self.known_providers()),
                "session.provider",
            )
        info: ModelInfo | None = None
        if stt is not None:
            offer = self.offer(provider)
            if not offer.faulty:
                try:
                    info = stt.find_model(model)
                except Exception as exc:
                    offer = Offer((), self._failed(provider, "find its model", exc), faulty=True)
            if offer.faulty:
                raise ResolutionError(
                    "provider_unavailable",
                    f"{provider} is not available on this server: {offer.reason}",
                    "session.provider",
                )
            models = [m.name for m in offer.models]
            reason = offer.reason
        else:
            models = list(CATALOG[provider])
            reason = self.missing_reason(provider)
        if info is None and model not in models:
            raise ResolutionError(
                "invalid_session_config",
                f"unknown model {clip_echo(model)!r} for {provider}; expected one of "
                f"{', '.join(models)}",
                "session.model",
            )
        # "multi" asks for detection where the engine can: elsewhere the model's
        # language serves (plan_for). Checked whether or not the engine can serve
        # now: a request refused in production is refused in development too.
        multi = primary_subtag(language) == "multi"
        if info is not None and not info.has_language(language) and not multi:
            raise ResolutionError(
                "invalid_session_config",
                f"{provider}/{model} supports language {', '.join(info.languages or ())}, "
                f"not {clip_echo(language)!r}",
                "session.language",
            )
        if stt is not None and info is not None and reason is None:
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
        """Start every engine.  One that fails is logged and left out (unavailable,
        with the reason) so the others serve; LOCAL's failure stops the server, as
        every substituted session needs it."""
        for name, stt in self.engines.items():
            try:
                await stt.start()
            except Exception as exc:
                if name == "LOCAL":
                    raise
                log.exception("provider %s failed to start; left out", name)
                self.faults[name] = (
                    f"its engine failed to start ({type(exc).__name__}; see the server log)"
                )

    def is_ready(self) -> bool:
        return all(stt.is_ready() for name, stt in self.engines.items() if name not in self.faults)

    async def aclose(self) -> None:
        for name, stt in self.engines.items():
            try:
                await stt.aclose()
            except Exception:  # one engine's bug must not keep the others open
                log.exception("provider %s failed to close", name)
