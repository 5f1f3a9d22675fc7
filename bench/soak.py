"""Soak: many sessions opened, streamed and closed; memory, fds and tasks must come back.

Run by hand (never in CI), from the repository root:

    .venv/bin/python bench/soak.py --sequential 1000 --concurrent 200

Against one gateway process serving the ``NOOP`` provider (``bench/noop_provider.py``,
so the figure is the gateway's own bookkeeping), it (1) opens, streams 0.5 s of
audio into, and closes ``--sequential`` sessions one after another, then (2)
does the same with ``--concurrent`` sessions at once, streaming 2 s in real
time.  Before, between and after it reads the server's RSS
(``/proc/<pid>/status``), open file descriptors (``/proc/<pid>/fd``) and
asyncio task count (``/healthz``), and checks: RSS within 10% of the value
after warm-up, fds and tasks back to their starting counts.  Exit status 1 if
a check fails.

``--engine local`` runs the same on the embedded engine (Whisper tiny.en, one
decode worker): each session streams a spoken command (``goforward.raw`` from
``../shared/audio``) and must get its final, so every stream's decode,
speculative final and partial tasks are started and cleaned up (defaults
``--sequential 200 --concurrent 16``: each session costs a decode).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "bench")]

from tests.conftest import SHARED_AUDIO  # noqa: E402

from gateway_load import KEY, open_fds, rss_mb, start_gateway  # noqa: E402
from transcribe_gateway.audio.files import read_audio  # noqa: E402


def audio_messages(samples: bytes) -> list[str]:
    """``audio.append`` messages of 20 ms pcm16 each."""
    return [
        json.dumps(
            {"type": "audio.append", "audio": base64.b64encode(samples[i : i + 640]).decode()}
        )
        for i in range(0, len(samples), 640)
    ]


@dataclass(frozen=True)
class Workload:
    config: dict[str, object]
    short: list[str]
    """Audio of a sequential session (streamed at full speed)."""
    long: list[str]
    """Audio of a concurrent session (streamed in real time)."""
    expect_final: bool


def noop_workload() -> Workload:
    return Workload(
        {"provider": "NOOP", "model": "noop", "sample_rate": 16000},
        audio_messages(bytes(640 * 25)),
        audio_messages(bytes(640 * 100)),
        expect_final=False,
    )


def local_workload() -> Workload:
    speech = read_audio(SHARED_AUDIO / "goforward.raw").astype("<i2").tobytes()
    command = audio_messages(speech + bytes(16000 * 2))  # and 1 s of silence: the endpoint
    return Workload(
        {"provider": "LOCAL", "model": "whisper-tiny.en", "sample_rate": 16000},
        command,
        command,
        expect_final=True,
    )


async def one_session(url: str, workload: Workload, messages: list[str], pace_s: float) -> bool:
    """One session; True if it ended with session.closed (and its final, where due)."""
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {KEY}"}, ping_interval=None
    ) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": workload.config}))
        await ws.recv()
        for message in messages:
            await ws.send(message)
            if pace_s:
                await asyncio.sleep(pace_s)
        await ws.send(json.dumps({"type": "session.close"}))
        closed = final = False
        async for raw in ws:
            kind = json.loads(raw)["type"]
            closed = closed or kind == "session.closed"
            final = final or kind == "transcription.completed"
        return closed and (final or not workload.expect_final)


def health(http: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{http}/healthz", timeout=5) as r:
        data: dict[str, object] = json.loads(r.read())
        return data


def snapshot(pid: int, http: str, label: str) -> dict[str, float]:
    time.sleep(1.0)  # let closing sessions finish
    fds = float(open_fds(pid))  # before /healthz's own connection opens one
    state = health(http)
    snap = {
        "rss_mb": rss_mb(pid),
        "fds": fds,
        "tasks": float(state["tasks"]),  # type: ignore[arg-type]
        "sessions": float(state["sessions"]),  # type: ignore[arg-type]
    }
    print(f"{label:>28}: " + ", ".join(f"{k} {v:.1f}" for k, v in snap.items()), flush=True)
    return snap


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=("noop", "local"), default="noop")
    parser.add_argument("--sequential", type=int, help="default: 1000 (noop), 200 (local)")
    parser.add_argument("--concurrent", type=int, help="default: 200 (noop), 16 (local)")
    args = parser.parse_args()
    local = args.engine == "local"
    workload = local_workload() if local else noop_workload()
    sequential = args.sequential or (200 if local else 1000)
    concurrent = args.concurrent or (16 if local else 200)
    server = start_gateway("soak", "0-1")
    pid = server.proc.pid
    http = server.url.replace("ws://", "http://").removesuffix("/ws")
    try:
        for _ in range(20):  # warm-up: first sessions allocate caches and pools
            await one_session(server.url, workload, workload.short, 0)
        start = snapshot(pid, http, "after warm-up")
        started = time.monotonic()
        ok = sum(
            [await one_session(server.url, workload, workload.short, 0) for _ in range(sequential)]
        )
        print(
            f"{sequential} sequential sessions in {time.monotonic() - started:.1f} s, "
            f"{ok} ended as expected",
            flush=True,
        )
        after_seq = snapshot(pid, http, "after sequential")
        results = await asyncio.gather(
            *(one_session(server.url, workload, workload.long, 0.02) for _ in range(concurrent)),
            return_exceptions=True,
        )
        ok2 = sum(r is True for r in results)
        print(f"{concurrent} concurrent sessions, {ok2} ended as expected", flush=True)
        after_conc = snapshot(pid, http, "after concurrent")
    finally:
        server.stop()
    failures = []
    for label, snap in (("sequential", after_seq), ("concurrent", after_conc)):
        if snap["rss_mb"] > start["rss_mb"] * 1.10:
            failures.append(f"{label}: RSS {snap['rss_mb']:.1f} MB > 110% of {start['rss_mb']:.1f}")
        if snap["fds"] > start["fds"]:
            failures.append(f"{label}: {snap['fds']:.0f} fds > {start['fds']:.0f}")
        if snap["tasks"] > start["tasks"] or snap["sessions"]:
            failures.append(
                f"{label}: {snap['tasks']:.0f} tasks, {snap['sessions']:.0f} sessions left"
            )
    if ok != sequential or ok2 != concurrent:
        what = "session.closed" + (" and a final" if workload.expect_final else "")
        failures.append(f"some sessions did not end with {what}")
    print("\nPASS" if not failures else "\nFAIL:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
