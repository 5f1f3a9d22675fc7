"""Coverage-guided fuzzing (atheris) of the wire entry point: frames -> Session.

Run by hand, never in CI (it runs until its budget is spent)::

    python fuzz/fuzz_session.py --seconds 300

Each input is split into a few frames (text or binary) fed to one Session,
which the harness drives the way server/connection.py does (auth, configure,
close).  The invariants are those of tests/reliability/wire.py: nothing but
documented ``error`` codes and close codes, valid server frames only, state
changes along the drawn edges.  A violation is a crash: atheris stops and
writes the input to ``crash-*``.  At the end the script prints the figures
of docs/reliability.md: inputs tried, crashes, distinct error codes reached.

Extra arguments go to libFuzzer (e.g. ``-max_len=65536``); a corpus directory
may be given last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import atheris  # noqa: E402

with atheris.instrument_imports():
    import msgspec  # noqa: F401  (instrumented: its Python-level paths count for coverage)

    from transcribe_gateway.protocol import messages as m
    from transcribe_gateway.protocol import session as s

from tests.reliability.wire import CLIENT_CLOSE_CODES, GOOD_KEY, SESSION_CODES  # noqa: E402

EDGES = {
    s.State.AWAITING_AUTH: {s.State.AWAITING_AUTH, s.State.AWAITING_CONFIG, s.State.CLOSED},
    s.State.AWAITING_CONFIG: {
        s.State.AWAITING_CONFIG,
        s.State.STREAMING,
        s.State.DRAINING,
        s.State.CLOSED,
    },
    s.State.STREAMING: {s.State.STREAMING, s.State.DRAINING, s.State.CLOSED},
    s.State.DRAINING: {s.State.DRAINING, s.State.CLOSED},
    s.State.CLOSED: {s.State.CLOSED},
}
_FRAMES = [
    b'{"type":"auth","token":"good-key"}',
    b'{"type":"session.update","session":{"provider":"LOCAL","model":"whisper-tiny.en",'
    b'"sample_rate":8000,"input_audio_format":"mulaw","endpointing":300,'
    b'"vad":{"threshold":0.5,"prefix_padding_ms":300},"fallback":{"provider":"X","model":"y"}}}',
    b'{"type":"audio.append","audio":"AAAAAAAA"}',
    b'{"type":"session.close"}',
]
SEEDS = [
    b"\x00" + b"\n".join(_FRAMES),
    b"\x01" + b"\n".join(_FRAMES[1:]),
    b"\x03" + b"\n".join([_FRAMES[1], _FRAMES[3], _FRAMES[2], _FRAMES[1]]),
    b"\x01" + b"\n".join([_FRAMES[1], _FRAMES[3], _FRAMES[2], _FRAMES[1], _FRAMES[0]]),
    b"\x01" + _FRAMES[1] + b'\n{"type":"audio.append","audio":"' + b"A" * 900 + b'"}',
    b"\x00" + b"[" * 3000,
]

inputs = 0
error_codes: Counter[str] = Counter()
close_codes: Counter[int] = Counter()


def _effective(fmt: str) -> m.EffectiveConfig:
    return m.EffectiveConfig("LOCAL", "tiny", "en", fmt, 16000, 500)


def _check_out(session: s.Session) -> None:
    for frame in session.data_to_send():
        message = m.parse_server_message(frame)
        if isinstance(message, m.Error):
            if message.error.code not in SESSION_CODES:
                raise AssertionError(f"undocumented error code {message.error.code!r}")
            error_codes[message.error.code] += 1


def _frames(data: bytes) -> tuple[bool, list[str | bytes]]:
    """Input layout: a flags byte, then frames split on newlines.

    Flags: bit 0, the key came in the upgrade header; bit 1, the engine is
    slow to drain after ``session.close`` (frames keep arriving meanwhile).

    A frame starting with NUL is binary; one starting with 0x01 is a Python
    string that may hold lone surrogates; anything else is text as a
    WebSocket delivers it (valid UTF-8).
    """
    authenticated = bool(data[:1]) and bool(data[0] & 1)
    out: list[str | bytes] = []
    for raw in data[1:].split(b"\n")[:8]:
        if raw[:1] == b"\x00":
            out.append(raw[1:])
        elif raw[:1] == b"\x01":
            out.append(raw[1:].decode("utf-8", "surrogateescape"))
        else:
            out.append(raw.decode("utf-8", "replace"))
    return authenticated, out


def test_one_input(data: bytes) -> None:
    global inputs
    inputs += 1
    authenticated, frames = _frames(data)
    slow_drain = bool(data[:1]) and bool(data[0] & 2)
    session = s.Session(
        "ts_000000000000",
        authenticated=authenticated,
        max_chunk_bytes=640,
        max_message_bytes=4096,
    )
    session.data_to_send()
    for frame in frames:
        before = session.state
        code_before = session.close_code
        if isinstance(frame, bytes):
            session.receive_bytes(frame)
        else:
            session.receive_text(frame)
        if session.close_code is not None and code_before is None:
            if session.close_code not in CLIENT_CLOSE_CODES:
                raise AssertionError(f"undocumented close code {session.close_code}")
            close_codes[session.close_code] += 1
        _check_out(session)
        for event in session.events_received():
            if isinstance(event, s.Authenticate):
                assert before is s.State.AWAITING_AUTH
                if event.token == GOOD_KEY:
                    session.accept_auth()
                else:
                    session.reject_auth()
            elif isinstance(event, s.Configure):
                assert before in (s.State.AWAITING_CONFIG, s.State.STREAMING)
                session.accept_config(_effective(event.config.input_audio_format))
            elif isinstance(event, s.AudioReceived):
                assert before is s.State.STREAMING
                assert 0 < len(event.data) <= 640
                assert session.audio_format != "pcm16" or len(event.data) % 2 == 0
            else:
                assert before in (s.State.AWAITING_CONFIG, s.State.STREAMING)
                if not slow_drain:  # else the engine is still finishing: frames keep coming
                    session.send_closed(0.0, "client_close")
            _check_out(session)
        if session.state not in EDGES[before]:
            raise AssertionError(f"state {before} -> {session.state}")
        if (session.state is s.State.CLOSED) != (session.close_code is not None):
            raise AssertionError("closed state and close code disagree")


def _report(started: float, crashed: bool) -> None:
    figures = {
        "seconds": round(time.monotonic() - started, 1),
        "inputs_tried": inputs,
        "crashes": int(crashed),
        "distinct_error_codes": sorted(error_codes),
        "close_codes": {str(k): v for k, v in sorted(close_codes.items())},
    }
    print(json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="fuzzing budget")
    args, rest = parser.parse_known_args()
    out = ROOT / "test-artifacts"
    if not [a for a in rest if not a.startswith("-")]:
        # A scratch corpus (git-ignored), seeded with one valid frame of each type.
        corpus = out / "fuzz-corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            (corpus / f"seed-{i}").write_bytes(seed)
        rest.append(str(corpus))
    started = time.monotonic()
    deadline = started + args.seconds

    # The budget is kept here, not by libFuzzer's -max_total_time, because
    # libFuzzer leaves with _exit() and no figures would be printed.
    def run_one(data: bytes) -> None:
        try:
            test_one_input(data)
        except BaseException:
            _report(started, crashed=True)  # libFuzzer then writes the crash-* input
            raise
        if inputs % 512 == 0 and time.monotonic() > deadline:
            _report(started, crashed=False)
            os._exit(0)

    atheris.Setup([sys.argv[0], "-max_len=16384", f"-artifact_prefix={out}/", *rest], run_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
