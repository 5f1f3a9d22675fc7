"""The ``transcribe-gateway`` command: serve, stream, config check, keys, usage."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from transcribe_gateway.config import DEV_KEY, Settings, load_settings, unknown_env
from transcribe_gateway.exceptions import ConfigError, ProviderUnavailable

log = logging.getLogger("transcribe_gateway.config")


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gateway (embedded offline engine by default)")
    p.add_argument("--config", help="TOML config file (env TRANSCRIBE_CONFIG)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--strict-providers",
        action="store_true",
        default=None,
        help="refuse unconfigured cloud providers instead of serving them with LOCAL",
    )
    p.add_argument("--profile", choices=["development", "production"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.config,
        overrides={
            "host": args.host,
            "port": args.port,
            "strict_providers": args.strict_providers,
            "profile": args.profile,
            "log_level": getattr(args, "log_level", None),
            "log_format": getattr(args, "log_format", None),
        },
    )


def _checked(settings: Settings, *, serving: bool = False) -> Settings:
    """What ``serve`` refuses beyond a setting's own bounds (``config check`` too).

    ``serving``: also what only starting finds (the store file opened or created,
    or Redis answering; the default model's weights found), so that ``serve``
    stops with one line naming the setting rather than a traceback from inside
    the server. ``config check`` stays offline: it may run where Redis is not
    reachable, e.g. in a build.
    """
    if not settings.keys():
        # Stored keys (`keys create`) do not count: the store is not open yet.
        raise ConfigError("api_keys: the production profile needs at least one key")
    _check_default_model(settings)
    _check_plugins(settings, create=not serving)
    _check_provider_tables(settings)
    _check_event_loop(settings)
    if settings.store.backend == "sqlite":
        from transcribe_gateway.store import sqlite

        if serving:
            sqlite.open_database(Path(settings.store.path)).close()
        else:
            sqlite.check_path(settings.store.path)
    elif serving:
        _check_redis(settings.store.redis_url)
    if serving:
        _check_default_model_weights(settings)
    return settings


def _check_provider_tables(settings: Settings) -> None:
    """Each ``[providers.<NAME>]`` names a provider this server has: a misspelt one
    (``deepgramm``) is never read, and its provider's sessions would be served by
    LOCAL (development) or refused, without a word about the table."""
    if not settings.providers:
        return
    from importlib.metadata import entry_points

    from transcribe_gateway.providers.registry import (
        CATALOG,
        ENTRY_POINT_GROUP,
        plugin_class,
        provider_name,
    )

    # The names that read a table: the catalog's, installed entry points' (the
    # name they are declared under) and the plugins' (checked above: no error here).
    installed = list(entry_points(group=ENTRY_POINT_GROUP))
    known = {*CATALOG, *(ep.name.upper() for ep in installed)}
    known |= {plugin_class(spec)[0] for spec in settings.plugins}
    known.discard("LOCAL")
    unknown = [name for name in settings.providers if name not in known]
    if unknown:
        # An entry point's class may serve under another name than the entry point's
        # (the class's wins): load them only now, when a table is not matched yet.
        for ep in installed:
            try:
                klass = ep.load()
            except Exception:
                continue  # serve logs it and leaves it out
            if (name := provider_name(klass)) is not None and name != "LOCAL":
                known.add(name)
    for name in settings.providers:
        if name in known:
            continue
        if name == "LOCAL":
            raise ConfigError(
                "providers.LOCAL: the embedded engine takes no api_key or base_url "
                "(its settings are in [local]); remove the table"
            )
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean [providers.{close[0]}]? " if close else ""
        raise ConfigError(
            f"providers.{name}: no provider {name} on this server, so this table would "
            f"never be read ({hint}known: {', '.join(sorted(known))})"
        )


def _check_event_loop(settings: Settings) -> None:
    """``event_loop = "uvloop"`` where uvloop cannot be imported (Windows, not installed):
    uvicorn would fail on it with a traceback (``auto`` falls back to asyncio)."""
    if settings.event_loop != "uvloop":
        return
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f'event_loop: "uvloop" cannot be imported ({exc}); install uvloop, or set '
            '"auto" or "asyncio" (TRANSCRIBE_EVENT_LOOP)'
        ) from None


REDIS_CHECK_TIMEOUT_S = 3.0
"""Longest wait for Redis to answer ``serve``'s start-up ping (connect, then reply)."""


def _check_redis(url: str) -> None:
    """Redis answers a PING at ``url`` (once, bounded): the store's start would fail
    after the models load, with a traceback and exit status 3."""
    import redis
    from redis.backoff import NoBackoff
    from redis.connection import parse_url
    from redis.retry import Retry

    parts = parse_url(url)  # type: ignore[no-untyped-call]
    # Named by address, never by the URL: it may hold the password.
    where = parts.get("path") or f"{parts.get('host', 'localhost')}:{parts.get('port', 6379)}"
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CHECK_TIMEOUT_S,
        socket_timeout=REDIS_CHECK_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),  # one try: the bound is the timeout above
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        password = parts.get("password")
        if password:
            reason = reason.replace(str(password), "***")
        raise ConfigError(
            f"store.redis_url: Redis at {where} does not answer: {reason} (TRANSCRIBE_REDIS_URL)"
        ) from None
    finally:
        client.close()


def _check_default_model(settings: Settings) -> None:
    """``local.default_model`` must be a LOCAL model (by name: no weights are loaded)."""
    from transcribe_gateway.providers.local import (
        SPHINX_MODEL,
        is_whisper_hub_name,
        whisper_model_names,
    )

    name = settings.local.default_model
    known = [*whisper_model_names(settings.local), SPHINX_MODEL]
    if name in known or is_whisper_hub_name(name):  # as the LOCAL engine takes them
        return
    raise ConfigError(
        f"local.default_model: unknown LOCAL model {name!r} (TRANSCRIBE_LOCAL_DEFAULT_MODEL); "
        f"expected one of {', '.join(known)}, or whisper-<faster-whisper model name>"
    )


def _check_default_model_weights(settings: Settings) -> None:
    """The default Whisper model's weights are on this machine, or may be downloaded."""
    from transcribe_gateway.providers.local import SPHINX_MODEL
    from transcribe_gateway.providers.whisper_engine import resolve_whisper_model

    local = settings.local
    if local.default_model == SPHINX_MODEL:
        return
    try:
        resolve_whisper_model(local.default_model, local.whisper_models, local.allow_downloads)
    except ProviderUnavailable as exc:
        raise ConfigError(f"local.default_model: {exc.reason}") from None


def _check_plugins(settings: Settings, *, create: bool) -> None:
    """Load each of ``plugins`` as ``serve`` does (a bad one is a configuration error);
    with ``create`` (``config check``) also create its engine, which ``serve`` does
    later, once, in the registry (same error)."""
    if not settings.plugins:
        return
    from transcribe_gateway.providers.registry import check_plugins

    check_plugins(settings, create=create)


def _warn_unknown_env(*, to_log: bool) -> None:
    for warning in unknown_env():
        if to_log:
            log.warning(warning)
        else:
            print(f"transcribe-gateway: warning: {warning}", file=sys.stderr)


def _url_host(host: str) -> str:
    """``host`` as a URL writes it: IPv6 addresses in brackets."""
    if host in ("127.0.0.1", "0.0.0.0"):
        return "localhost"
    if host == "::":  # IPv6 only (as asyncio binds it), and localhost may be IPv4 only
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _serve(args: argparse.Namespace) -> int:
    from transcribe_gateway.server.logs import setup_logging
    from transcribe_gateway.server.runner import serve

    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_format)
    _warn_unknown_env(to_log=True)
    _checked(settings, serving=True)
    from transcribe_gateway.server.runner import bind_sockets

    # Bound now, before the models load (minutes, on a cold cache), so that a port
    # in use or a bad host stops here with one line; uvicorn listens on them.
    sockets = bind_sockets(settings.host, settings.port)
    host = _url_host(settings.host)
    # The bound port: with port = 0 the system picks it.
    port = sockets[0].getsockname()[1]
    url = f"ws://{host}:{port}/ws"

    def banner() -> None:
        # Printed once the server is listening (the model loads first), so the line
        # it suggests works at once. To the terminal, not the log: the key is never
        # in log files.
        print(f"transcribe-gateway: WebSocket URL {url}", file=sys.stderr)
        if settings.api_keys:
            # Configured keys are secrets: say where the command reads one, never print it.
            key, note = "", "  (with TRANSCRIBE_API_KEY set to one of your api_keys)"
        else:
            print(
                f"transcribe-gateway: development key: {DEV_KEY}  (set TRANSCRIBE_API_KEYS to "
                "use your own)",
                file=sys.stderr,
            )
            key, note = f" --key {DEV_KEY}", ""  # explicit: a TRANSCRIBE_API_KEY set would win
        print(
            f"transcribe-gateway: try  transcribe-gateway stream --url {url}{key} "
            f"../shared/audio/jfk.flac{note}",
            file=sys.stderr,
        )
        if settings.profile == "development":
            print(
                f"transcribe-gateway: demo page http://{host}:{port}/  (local development)",
                file=sys.stderr,
            )

    serve(settings, on_ready=banner, sockets=sockets)
    return 0


def _config_check(args: argparse.Namespace) -> int:
    _warn_unknown_env(to_log=False)
    settings = _checked(load_settings(args.config))
    print(f"configuration OK (profile {settings.profile}, port {settings.port})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from transcribe_gateway.client.cli import add_stream_parser

    parser = argparse.ArgumentParser(
        prog="transcribe-gateway", description="Real-time speech-to-text gateway"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    add_stream_parser(sub)
    from transcribe_gateway.store.cli import add_parsers as add_store_parsers

    add_store_parsers(sub)
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate the configuration and exit")
    check.add_argument("--config", help="TOML config file (env TRANSCRIBE_CONFIG)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "config":
            return _config_check(args)
        if args.command in ("keys", "usage"):
            from transcribe_gateway.store import cli as store_cli

            return store_cli.run_keys(args) if args.command == "keys" else store_cli.run_usage(args)
        from transcribe_gateway.client.cli import stream_main

        return stream_main(args)  # Ctrl-C: 130, no traceback
    except ConfigError as exc:
        print(f"transcribe-gateway: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
