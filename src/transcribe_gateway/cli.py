"""The ``transcribe-gateway`` command: serve, stream, config check, keys, usage."""

from __future__ import annotations

import argparse
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
    the default model's weights found), so that ``serve`` stops with one line
    naming the setting rather than a traceback from inside the server.
    """
    if not settings.keys():
        # Stored keys (`keys create`) do not count: the store is not open yet.
        raise ConfigError("api_keys: the production profile needs at least one key")
    _check_default_model(settings)
    _check_plugins(settings, create=not serving)
    if settings.store.backend == "sqlite":
        from transcribe_gateway.store import sqlite

        if serving:
            sqlite.open_database(Path(settings.store.path)).close()
        else:
            sqlite.check_path(settings.store.path)
    if serving:
        _check_default_model_weights(settings)
    return settings


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
    if host in ("127.0.0.1", "0.0.0.0", "::"):
        return "localhost"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _serve(args: argparse.Namespace) -> int:
    from transcribe_gateway.server.logs import setup_logging
    from transcribe_gateway.server.runner import serve

    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_format)
    _warn_unknown_env(to_log=True)
    _checked(settings, serving=True)
    host = _url_host(settings.host)
    url = f"ws://{host}:{settings.port}/ws"

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
                f"transcribe-gateway: demo page http://{host}:{settings.port}/  "
                "(local development)",
                file=sys.stderr,
            )

    serve(settings, on_ready=banner)
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
