"""bench/local_engine.py run small: failed sessions are reported, never a crash."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.bench.harness import bench_gateway, local_engine


def test_one_session_at_a_time_reports_failed_sessions(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The gateway refuses every session (an unknown model): no final comes, and
    # the streaming part must say so beside its WER rather than crash on no latency.
    gateway = bench_gateway("bench-local-refused")
    refs = {"a": "hello world", "b": "go forward"}
    clips = {name: np.zeros(3200, np.int16) for name in refs}

    def start_server(workers: int, cpus: str | None) -> tuple[subprocess.Popen[bytes], str]:
        return gateway.proc, gateway.url

    monkeypatch.setattr(
        local_engine, "load_clips", lambda clip_set: (clips, refs, {"all": [*refs]})
    )
    monkeypatch.setattr(local_engine, "batch_figures", lambda *args: ({"all": 0.1}, 0.1))
    monkeypatch.setattr(local_engine, "start_server", start_server)
    argv = ["local_engine.py", "--model", "no-such-model", "--sessions", "", "--runs", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        local_engine.main()
    finally:
        gateway.stop()
    out = capsys.readouterr().out
    assert "WER all 1.000" in out, out
    assert "; errors 2 (" in out, out
    assert "in 2 of 2 sessions" in out, out
    assert "median nan s, p95 nan s" in out, out
