"""``transcribe-gateway stream FILE``: stream an audio file to a server and print the text.

The main ``transcribe-gateway`` command wires :func:`add_stream_parser` and
:func:`run_stream`; ``python -m transcribe_gateway.client.cli stream FILE``
runs the same command on its own.

Output: with ``--json`` every server message is one JSON object per line on
stdout and nothing else goes to stdout.  Otherwise each final is printed as
``[start-end] text`` (seconds), the current partial is shown on one live line
when stdout is a terminal (not at all when it is not), and a timing summary
goes to stderr.  Server ``error`` messages are always reported on stderr too.
Exit codes: 0 success, 1 server error (any ``error`` message) or a session
that ended without ``session.closed`` (any abnormal close, 1000 and 1001 too:
its transcript is incomplete; the finals that came and the summary are
still printed), 2 bad arguments (a malformed ``--url`` too) or
unreadable file, 141 (quietly) when stdout's reader went away
(``stream --json FILE | head -1``), as for a tool killed by SIGPIPE, 130 after
Ctrl-C.

Ctrl-C while streaming stops sending, ends the session gracefully (the finals
of the audio sent are printed, then the summary) and exits 130; the wait is
bounded (10 s).  A second Ctrl-C, or one before streaming began, exits 130 at
once.  Neither prints a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import msgspec
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.uri import parse_uri

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.files import RAW_SUFFIXES, read_audio
from transcribe_gateway.client.sdk import (
    Event,
    StreamResult,
    TranscribeClient,
    TranscribeConnectionClosed,
    TranscribeError,
    TranscribeUnauthorized,
    event_to_dict,
)
from transcribe_gateway.protocol.messages import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    Error,
    TranscriptionCompleted,
    TranscriptionPartial,
)

DEFAULT_URL = "ws://127.0.0.1:8000/ws"
DEFAULT_KEY = "dev-key"
CONFIGURE_TIMEOUT_S = 120.0
"""Bound on waiting for ``session.updated`` (the first load of a local model is slow)."""

EXIT_OK = 0
EXIT_SERVER = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a tool whose stdout reader went away."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT: what a shell reports for a tool stopped with Ctrl-C."""
INTERRUPT_GRACE_S = 10.0
"""After a first Ctrl-C: how long the session may take to end (its last finals)."""

_CLEAR_LINE = "\r\x1b[K"


def _sample_rate(text: str) -> int:
    try:
        rate = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, not {rate}"
        )
    return rate


def add_stream_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``stream`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.

    Returns:
        The new subparser (its namespace is what :func:`run_stream` expects).
    """
    parser = subparsers.add_parser(
        "stream",
        help="stream an audio file to a transcribe-gateway server and print the transcript",
        description=(
            "Stream an audio file (wav, flac, mp3, ogg, or raw pcm16 .raw/.pcm) to a "
            "Transcribe WebSocket server, in real time unless --fast, and print the "
            "transcript. Exit codes: 0 ok, 1 server error or a session that ended "
            "without session.closed, 2 bad arguments or unreadable file, 141 stdout "
            "closed by its reader, 130 interrupted (a first Ctrl-C ends the session "
            "and prints its last finals, a second quits at once)."
        ),
    )
    parser.add_argument("file", metavar="FILE", type=Path, help="audio file to stream")
    parser.add_argument(
        "--url",
        default=os.environ.get("TRANSCRIBE_URL", DEFAULT_URL),
        help=f"WebSocket endpoint (env TRANSCRIBE_URL, default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--key",
        default=os.environ.get("TRANSCRIBE_API_KEY", DEFAULT_KEY),
        help=f"API key or token (env TRANSCRIBE_API_KEY, default {DEFAULT_KEY})",
    )
    parser.add_argument(
        "--auth",
        choices=("header", "message"),
        default="header",
        help="send the key as an Authorization header or as a first auth message",
    )
    parser.add_argument("--provider", default="LOCAL", help="speech engine (default LOCAL)")
    parser.add_argument(
        "--model", default="whisper-tiny.en", help="model name (default whisper-tiny.en)"
    )
    parser.add_argument("--language", default="en", help="BCP-47 code or 'multi' (default en)")
    parser.add_argument("--prompt", default=None, help="bias text: keyterms or context")
    parser.add_argument(
        "--rate",
        type=_sample_rate,
        default=16000,
        help="sample rate of raw pcm16 files, and the session rate audio is sent at "
        "(default 16000)",
    )
    parser.add_argument(
        "--format",
        dest="audio_format",
        choices=("pcm16", "mulaw", "alaw"),
        default="pcm16",
        help="wire encoding of the audio sent (default pcm16)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="send as fast as possible, not in real time"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print every server message as one JSON object per line on stdout",
    )
    return parser


class _StdoutClosed(Exception):
    """Nobody reads stdout any more (a broken pipe): stop streaming."""


class _Printer:
    """Renders server messages for a person (or as JSON lines)."""

    def __init__(self, *, json_lines: bool, out: TextIO, err: TextIO) -> None:
        self.json_lines = json_lines
        self.out = out
        self.err = err
        self.live = out.isatty() and not json_lines
        self._partial_shown = False
        self.had_error = False

    def on_event(self, event: Event) -> None:
        if isinstance(event, Error):
            self.had_error = True
            self.error(_describe_error(event))
        if self.json_lines:
            self._write(msgspec.json.encode(event_to_dict(event)).decode() + "\n")
        elif isinstance(event, TranscriptionPartial):
            if self.live:
                self._write(_CLEAR_LINE + _fit(event.text.strip()))
                self._partial_shown = True
        elif isinstance(event, TranscriptionCompleted):
            self.clear_live()
            text = event.text.strip()
            if text:
                start, end = event.start_ms / 1000, event.end_ms / 1000
                self._write(f"[{start:.2f}-{end:.2f}] {text}\n")

    def clear_live(self) -> None:
        if self._partial_shown:
            self._write(_CLEAR_LINE)
            self._partial_shown = False

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError as exc:  # a distinct type: not a failure to connect
            raise _StdoutClosed from exc

    def error(self, message: str) -> None:
        self.notice(f"error: {message}")

    def notice(self, message: str) -> None:
        self.clear_live()
        print(message, file=self.err, flush=True)


class _Interrupt:
    """Ctrl-C: the first ends a stream gracefully, the second (or one before) quits now.

    ``stop`` is what :meth:`TranscribeClient.stream_samples` watches; quitting
    drops the connection and cancels the command's task.
    """

    def __init__(self, printer: _Printer) -> None:
        self.printer = printer
        self.stop = asyncio.Event()
        self.client: TranscribeClient | None = None
        self.streaming = False
        self.pressed = False
        self.quitting = False
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):  # no signals here
            yield  # Ctrl-C raises KeyboardInterrupt: stream_main() exits 130
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if self._timer is not None:
                self._timer.cancel()

    def _on_sigint(self) -> None:
        first = not self.pressed
        self.pressed = True
        if first and self.streaming:
            self.stop.set()
            self.printer.notice(
                "interrupted: ending the session (press Ctrl-C again to quit at once)"
            )
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(INTERRUPT_GRACE_S, self._too_slow)
        else:
            self.quit()

    def _too_slow(self) -> None:
        self.printer.notice(f"interrupted: the session did not end within {INTERRUPT_GRACE_S:g} s")
        self.quit()

    def quit(self) -> None:
        self.quitting = True
        if self.client is not None:
            self.client.abort()
        if self._task is not None:
            self._task.cancel()


def _fit(text: str) -> str:
    """Keep a partial on one terminal line (its most recent words)."""
    width = max(20, shutil.get_terminal_size().columns - 1)
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _describe_error(event: Error) -> str:
    info = event.error
    field = f" (field {info.field})" if info.field else ""
    return f"{info.code}: {info.message}{field}"


def _summary(result: StreamResult, fast: bool) -> str:
    t = result.timings
    pace = "as fast as possible" if fast else "in real time"
    lines = [f"audio: {result.audio_seconds:.2f} s sent {pace}, {result.wall_seconds:.2f} s wall"]
    if t.first_partial_s is not None:
        lines.append(f"time to first partial: {t.first_partial_s:.3f} s")
    else:
        lines.append("time to first partial: no partials")
    median, worst = t.median_final_latency_s, t.max_final_latency_s
    if median is not None and worst is not None:
        lines.append(
            f"final latency: median {median:.3f} s, max {worst:.3f} s "
            f"over {len(t.final_latencies_s)} final(s)"
        )
    else:
        lines.append("final latency: no finals")
    closed = result.closed
    if closed is not None:
        lines.append(
            f"session {closed.session.id} closed ({closed.reason}): "
            f"usage {closed.usage.audio_seconds:.2f} s of audio"
        )
    else:
        lines.append(f"session {result.session_id} ended without session.closed")
    return "\n".join(lines)


def _bad_url(url: str) -> str | None:
    """Why ``url`` is no WebSocket URL (a port out of range...), or None if it is one."""
    try:
        parse_uri(url)
    except (InvalidURI, ValueError) as exc:  # urllib raises ValueError for bad ports
        return str(exc)
    return None


def _load(args: argparse.Namespace) -> Samples:
    path: Path = args.file
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    raw_rate = args.rate if path.suffix.lower() in RAW_SUFFIXES else None
    samples = read_audio(path, rate=args.rate, raw_rate=raw_rate)
    if len(samples) == 0:
        raise ValueError(f"no audio in {path}")
    return samples


async def run_stream(args: argparse.Namespace) -> int:
    """Run ``stream`` with the namespace parsed by :func:`add_stream_parser`'s parser.

    Args:
        args: parsed arguments.

    Returns:
        The exit code: 0 success, 1 server error or a session that ended
        without ``session.closed``, 2 bad arguments or unreadable file, 141
        stdout closed by its reader, 130 interrupted (SIGINT).
    """
    printer = _Printer(json_lines=args.json, out=sys.stdout, err=sys.stderr)
    interrupt = _Interrupt(printer)
    with interrupt.installed():
        try:
            code = await _run_stream(args, printer, interrupt)
        except _StdoutClosed:
            _discard_stdout()
            return EXIT_BROKEN_PIPE
        except asyncio.CancelledError:
            if not interrupt.quitting:
                raise
            return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if interrupt.pressed else code


def stream_main(args: argparse.Namespace) -> int:
    """Run ``stream`` in its own event loop: what both entry points call.

    Args:
        args: parsed arguments.

    Returns:
        The exit code of :func:`run_stream`; 130 when Ctrl-C came outside of
        it (no traceback).
    """
    try:
        return asyncio.run(run_stream(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _discard_stdout() -> None:
    # What is left in stdout's buffer would fail again at exit, with a message.
    with contextlib.suppress(OSError, ValueError):  # ValueError: no real file (tests)
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


async def _run_stream(args: argparse.Namespace, printer: _Printer, interrupt: _Interrupt) -> int:
    if (why := _bad_url(args.url)) is not None:
        printer.error(f"--url {args.url!r}: {why}")
        return EXIT_USAGE
    try:
        samples = await asyncio.to_thread(_load, args)
    except (OSError, ValueError) as exc:
        printer.error(f"cannot read {args.file}: {exc}")
        return EXIT_USAGE
    try:
        async with TranscribeClient.connect(args.url, args.key, auth=args.auth) as client:
            interrupt.client = client
            try:
                async with asyncio.timeout(CONFIGURE_TIMEOUT_S):
                    await client.configure(
                        provider=args.provider,
                        model=args.model,
                        language=args.language,
                        prompt=args.prompt,
                        input_audio_format=args.audio_format,
                        sample_rate=args.rate,
                    )
            except TranscribeError:
                for event in client.drain_events():  # prints the error (and JSON lines)
                    printer.on_event(event)
                return EXIT_SERVER
            interrupt.streaming = True
            result = await client.stream_samples(
                samples, fast=args.fast, on_event=printer.on_event, stop=interrupt.stop
            )
    except InvalidURI as exc:
        printer.error(str(exc))
        return EXIT_USAGE
    except TranscribeUnauthorized as exc:
        printer.error(f"unauthorized: the server refused the key ({exc})")
        return EXIT_SERVER
    except TranscribeError as exc:  # an error before session.created
        printer.error(str(exc))
        return EXIT_SERVER
    except TranscribeConnectionClosed as exc:
        printer.error(str(exc))
        if exc.result is not None:  # cut mid-stream: what came, and how fast
            printer.clear_live()
            print(_summary(exc.result, args.fast), file=sys.stderr, flush=True)
        return EXIT_SERVER
    except TimeoutError:
        printer.error(f"timed out talking to {args.url}")
        return EXIT_SERVER
    except (OSError, InvalidHandshake) as exc:
        printer.error(f"cannot connect to {args.url}: {exc}")
        return EXIT_SERVER
    printer.clear_live()
    print(_summary(result, args.fast), file=sys.stderr, flush=True)
    return EXIT_SERVER if printer.had_error else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m transcribe_gateway.client.cli stream FILE``.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="transcribe-gateway")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_stream_parser(subparsers)
    args = parser.parse_args(argv)
    return stream_main(args)


if __name__ == "__main__":
    sys.exit(main())
