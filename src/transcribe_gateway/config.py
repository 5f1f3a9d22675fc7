"""Server settings: defaults, a TOML file, then environment variables (env wins), then flags.

Validated once at start with msgspec, so a bad value fails fast with a message
that names the setting (``ConfigError``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from transcribe_gateway.exceptions import ConfigError

DEV_KEY: Final = "dev-key"
"""Key accepted in the development profile when no key is configured."""


class LocalSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The embedded offline engine."""

    default_model: str = "whisper-tiny.en"
    workers: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    """Decode threads; 0 = one per CPU core."""
    whisper_models: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra Whisper models: name -> CTranslate2 directory or hub name (e.g. ``base.en``)."""
    allow_downloads: bool = True
    """Let faster-whisper fetch a hub model by name (needs the internet)."""
    whisper_beam_size: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5
    partial_interval_ms: Annotated[int, msgspec.Meta(ge=100, le=10000)] = 700
    """How often the open utterance is re-decoded for a partial (skipped when busy)."""
    max_sessions_per_worker: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 8
    """Whisper sessions admitted per decode worker (measured in BENCHMARKS.md: final
    latency holds up to 8 real-time talkers per core, and doubles at 12)."""
    sphinx_sessions_per_worker: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    """pocketsphinx sessions per worker: continuous speech costs ~0.4 core-seconds a
    second (a live pass for partials and a second pass for finals)."""
    max_utterance_ms: Annotated[int, msgspec.Meta(ge=1000, le=30000)] = 25000
    final_context: bool = True
    """Decode each Whisper final in context: after the session's speech of the 5 s
    before it and before a repeat of it, in Whisper's one 30 s window (streaming WER
    nearer batch, ~15-25% more decode time; BENCHMARKS.md). false: each utterance alone,
    as are the finals of sessions with a ``prompt``, which context would outweigh."""


class StoreSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where keys, usage and (with several replicas) live limits are kept."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    """``sqlite``: one file, one gateway process; ``redis``: shared by N replicas."""
    path: str = "./transcribe-gateway.db"
    """SQLite file (created on first use)."""
    redis_url: str = ""
    """e.g. ``redis://localhost:6379/0`` (required with ``backend = "redis"``)."""
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    """A session slot held by a replica that died is freed after this long."""
    recheck_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    """How often open sessions' keys are re-checked (revocation, expiry, quota)."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    profile: Literal["development", "production"] = "development"
    strict_providers: bool = False
    """Refuse (``provider_unavailable``) an unconfigured provider instead of using LOCAL."""
    api_keys: list[str] = msgspec.field(default_factory=list)
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    """Browser origins (``https://app.example.com``) that may open ``/ws``; ``*``: any.
    Empty: any, but while the public development key is in force only pages on this
    machine. Clients that are not browsers send no origin and are not checked."""
    auth_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    token_secret: str = ""
    """HMAC secret of the short-lived session tokens; replicas must share it (empty: random)."""
    token_max_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 300
    """Longest TTL ``POST /v1/tokens`` grants."""
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0
    drain_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 15.0
    """Grace period to finish pending audio on ``session.close``, idle close and SIGTERM."""
    max_chunk_bytes: Annotated[int, msgspec.Meta(ge=320, le=16 * 1024 * 1024)] = 128 * 1024
    """Largest decoded ``audio.append`` chunk; above it: ``audio_too_large``."""
    max_message_bytes: Annotated[int, msgspec.Meta(ge=4096, le=64 * 1024 * 1024)] = 1024 * 1024
    """Largest text frame; above it the connection is closed with 1008."""
    ws_read_ahead: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    """Client messages read ahead of the session before the socket is paused (backpressure)."""
    ws_ping_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 20.0
    """A client the server heard nothing from this long is pinged (keepalive) ..."""
    ws_ping_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 20.0
    """... and closed (1001) if its pong does not come within this."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """``auto``: uvloop where it is installed (Linux, macOS), else asyncio's own loop."""
    outgoing_queue: Annotated[int, msgspec.Meta(ge=8, le=100000)] = 512
    """Messages held for a slow client once its socket buffer is full, before it is closed
    (partials are dropped first)."""
    endpointing_ms: Annotated[int, msgspec.Meta(ge=10, le=10000)] = 500
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    max_sessions_per_key: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Concurrent sessions one key may hold (0 = no limit); over it: close 4029."""
    plugins: list[str] = msgspec.field(default_factory=list)
    """Extra provider classes as ``module:Class`` (besides the entry point group)."""
    local: LocalSettings = msgspec.field(default_factory=LocalSettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    provider_connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    """Longest wait to connect to a cloud provider and finish its handshake."""
    provider_response_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    """A provider that answers nothing for this long while it should is failed (fallback)."""
    provider_finalize_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 5.0
    """Longest wait for a provider to flush its last words after the end of the audio."""
    fallback_buffer_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 120.0
    """Audio kept since the last final for replay into a fallback (oldest dropped beyond)."""
    providers: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """Per cloud provider settings (``api_key``, ``base_url``), e.g. ``[providers.DEEPGRAM]``."""

    @property
    def public_key(self) -> bool:
        """Whether :data:`DEV_KEY`, which anyone can know, is accepted."""
        return not self.api_keys and self.profile == "development"

    def keys(self) -> list[str]:
        """The API keys in force; the development profile falls back to :data:`DEV_KEY`."""
        if self.api_keys:
            return list(self.api_keys)
        return [DEV_KEY] if self.profile == "development" else []

    def provider_setting(self, provider: str, name: str) -> str | None:
        """A cloud provider's setting: ``<PROVIDER>_<NAME>`` env var, else the config file."""
        env = os.environ.get(f"{provider}_{name.upper()}")
        if env:
            return env
        value = self.providers.get(provider, {}).get(name)
        return value if isinstance(value, str) else None


# Environment variables that override the file: name -> (section path, kind).
_ENV: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "TRANSCRIBE_HOST": (("host",), "str"),
    "TRANSCRIBE_PORT": (("port",), "int"),
    "TRANSCRIBE_PROFILE": (("profile",), "str"),
    "TRANSCRIBE_STRICT_PROVIDERS": (("strict_providers",), "bool"),
    "TRANSCRIBE_API_KEYS": (("api_keys",), "list"),
    "TRANSCRIBE_ALLOWED_ORIGINS": (("allowed_origins",), "list"),
    "TRANSCRIBE_AUTH_TIMEOUT_S": (("auth_timeout_s",), "float"),
    "TRANSCRIBE_TOKEN_SECRET": (("token_secret",), "str"),
    "TRANSCRIBE_TOKEN_MAX_TTL_S": (("token_max_ttl_s",), "int"),
    "TRANSCRIBE_IDLE_TIMEOUT_S": (("idle_timeout_s",), "float"),
    "TRANSCRIBE_DRAIN_TIMEOUT_S": (("drain_timeout_s",), "float"),
    "TRANSCRIBE_MAX_CHUNK_BYTES": (("max_chunk_bytes",), "int"),
    "TRANSCRIBE_MAX_MESSAGE_BYTES": (("max_message_bytes",), "int"),
    "TRANSCRIBE_ENDPOINTING_MS": (("endpointing_ms",), "int"),
    "TRANSCRIBE_WS_READ_AHEAD": (("ws_read_ahead",), "int"),
    "TRANSCRIBE_WS_PING_INTERVAL_S": (("ws_ping_interval_s",), "float"),
    "TRANSCRIBE_WS_PING_TIMEOUT_S": (("ws_ping_timeout_s",), "float"),
    "TRANSCRIBE_EVENT_LOOP": (("event_loop",), "str"),
    "TRANSCRIBE_OUTGOING_QUEUE": (("outgoing_queue",), "int"),
    "TRANSCRIBE_MAX_SESSIONS_PER_KEY": (("max_sessions_per_key",), "int"),
    "TRANSCRIBE_PLUGINS": (("plugins",), "list"),
    "TRANSCRIBE_PROVIDER_CONNECT_TIMEOUT_S": (("provider_connect_timeout_s",), "float"),
    "TRANSCRIBE_PROVIDER_RESPONSE_TIMEOUT_S": (("provider_response_timeout_s",), "float"),
    "TRANSCRIBE_PROVIDER_FINALIZE_TIMEOUT_S": (("provider_finalize_timeout_s",), "float"),
    "TRANSCRIBE_FALLBACK_BUFFER_S": (("fallback_buffer_s",), "float"),
    "TRANSCRIBE_LOG_LEVEL": (("log_level",), "str"),
    "TRANSCRIBE_LOG_FORMAT": (("log_format",), "str"),
    "TRANSCRIBE_STORE_BACKEND": (("store", "backend"), "str"),
    "TRANSCRIBE_STORE_PATH": (("store", "path"), "str"),
    "TRANSCRIBE_REDIS_URL": (("store", "redis_url"), "str"),
    "TRANSCRIBE_STORE_LEASE_TTL_S": (("store", "lease_ttl_s"), "float"),
    "TRANSCRIBE_STORE_RECHECK_INTERVAL_S": (("store", "recheck_interval_s"), "float"),
    "TRANSCRIBE_LOCAL_WORKERS": (("local", "workers"), "int"),
    "TRANSCRIBE_LOCAL_DEFAULT_MODEL": (("local", "default_model"), "str"),
    "TRANSCRIBE_LOCAL_ALLOW_DOWNLOADS": (("local", "allow_downloads"), "bool"),
    "TRANSCRIBE_LOCAL_PARTIAL_INTERVAL_MS": (("local", "partial_interval_ms"), "int"),
    "TRANSCRIBE_LOCAL_FINAL_CONTEXT": (("local", "final_context"), "bool"),
    "TRANSCRIBE_LOCAL_MAX_SESSIONS_PER_WORKER": (("local", "max_sessions_per_worker"), "int"),
    "TRANSCRIBE_LOCAL_SPHINX_SESSIONS_PER_WORKER": (("local", "sphinx_sessions_per_worker"), "int"),
    "TRANSCRIBE_LOCAL_WHISPER_BEAM_SIZE": (("local", "whisper_beam_size"), "int"),
    "TRANSCRIBE_LOCAL_MAX_UTTERANCE_MS": (("local", "max_utterance_ms"), "int"),
}

OTHER_ENV: Final = frozenset(
    {"TRANSCRIBE_CONFIG", "TRANSCRIBE_URL", "TRANSCRIBE_API_KEY", "TRANSCRIBE_KEY"}
)
"""``TRANSCRIBE_*`` variables read elsewhere: the config file's path, the ``stream``
client's endpoint and key, and the key of docs/browser.md's Node example (a shell may
export them beside the server's)."""


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for ``TRANSCRIBE_*`` variables that no setting reads (a typo does nothing).

    Not errors: other tools may share the prefix.
    """
    environ = os.environ if environ is None else environ
    known = set(_ENV) | OTHER_ENV
    warnings = []
    for name in sorted(environ):
        if name.startswith("TRANSCRIBE_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{name} is not a transcribe-gateway setting; ignored{hint}")
    return warnings


def _env_value(name: str, raw: str, kind: str) -> Any:
    if kind == "list":
        return [part.strip() for part in raw.split(",") if part.strip()]
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        # Empty is refused, not false: an unset variable in a compose file passes
        # "" and would silently turn a default-on setting off.
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    if kind in {"int", "float"}:
        try:
            return int(raw) if kind == "int" else float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
    return raw


PROVIDER_SETTINGS: Final = ("api_key", "base_url")
"""What a ``[providers.<NAME>]`` table may set (anything else would be ignored)."""


def _provider_tables(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``[providers.<NAME>]`` by the provider's name as the protocol spells it
    (``deepgram`` is ``DEEPGRAM``), and only settings that are read: a typo
    (``api_kye``) would otherwise be accepted and ignored, and the session served
    by another engine without a word. Names are checked before values (typed
    here, not by the decoder), so that a typo is named whatever its value."""
    merged: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        for setting, value in table.items():
            if setting not in PROVIDER_SETTINGS:
                raise ConfigError(
                    f"providers.{name}.{setting}: unknown setting "
                    f"(expected {' or '.join(PROVIDER_SETTINGS)})"
                )
            if not isinstance(value, str):
                raise ConfigError(f"providers.{name}.{setting}: expected a string")
        merged.setdefault(name.upper(), {}).update(table)
    return merged


def _check_redis_url(url: str) -> None:
    from redis.connection import parse_url

    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError) as exc:
        # The parser's words may quote part of a password it split at a "/" or ":".
        reason = (
            "not a valid Redis URL (percent-encode special characters in the password)"
            if "@" in url
            else str(exc)
        )
        raise ConfigError(f"store.redis_url: {reason} (TRANSCRIBE_REDIS_URL)") from None


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: file, then environment, then ``overrides`` (CLI flags).

    Raises:
        ConfigError: unreadable file or a bad value, naming the setting.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    path = path or environ.get("TRANSCRIBE_CONFIG")
    if path:
        try:
            data = msgspec.toml.decode(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML (UTF-8): {exc}") from None
    for name, (where, kind) in _ENV.items():
        if name in environ:
            target = data
            for part in where[:-1]:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{part}: expected a table (needed for {name})")
            target[where[-1]] = _env_value(name, environ[name], kind)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    try:
        settings = msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from None
    settings.providers = _provider_tables(settings.providers)
    if not settings.host.strip():
        # uvicorn reads "" as every interface: a compose file's unset variable would
        # put the server (and, with no key, the public dev-key) on the network.
        raise ConfigError(
            "host: empty (TRANSCRIBE_HOST); every interface is 0.0.0.0 (or :: for IPv6)"
        )
    for key in settings.api_keys:
        if not key.strip():
            # KeyChecker drops it: a production server would start with no usable key.
            raise ConfigError("api_keys: a key is empty or blank (TRANSCRIBE_API_KEYS)")
    if settings.store.backend == "redis" and not settings.store.redis_url:
        raise ConfigError(
            'store.redis_url: required with store.backend = "redis" (TRANSCRIBE_REDIS_URL)'
        )
    # Only the backend in use: the other's setting may be left over, unused.
    if settings.store.backend == "redis":
        _check_redis_url(settings.store.redis_url)
    elif not settings.store.path.strip():
        raise ConfigError("store.path: empty (TRANSCRIBE_STORE_PATH)")
    # A chunk at the limit must fit in a frame as base64 plus its JSON envelope.
    if 4 * -(-settings.max_chunk_bytes // 3) + 64 > settings.max_message_bytes:
        raise ConfigError(
            "max_chunk_bytes: its base64 form must fit in max_message_bytes "
            f"({settings.max_chunk_bytes} bytes of audio need about "
            f"{4 * -(-settings.max_chunk_bytes // 3) + 64} bytes per frame)"
        )
    return settings
