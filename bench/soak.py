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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import urllib.request
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "bench")]

from gateway_load import KEY, open_fds, rss_mb, start_gateway  # noqa: E402

CHUNK = json.dumps({"type": "audio.append", "audio": base64.b64encode(bytes(640)).decode()})


def health(http: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{http}/healthz", timeout=5) as r:
        data: dict[str, object] = json.loads(r.read())
        return data


async def one_session(url: str, chunks: int, pace_s: float) -> bool:
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {KEY}"}, ping_interval=None
    ) as ws:
        await ws.recv()
        config = {"provider": "NOOP", "model": "noop", "sample_rate": 16000}
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        await ws.recv()
        for _ in range(chunks):
            await ws.send(CHUNK)
            if pace_s:
                await asyncio.sleep(pace_s)
        await ws.send(json.dumps({"type": "session.close"}))
        closed = False
        async for raw in ws:
            closed = closed or json.loads(raw)["type"] == "session.closed"
        return closed


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
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=200)
    args = parser.parse_args()
    server = start_gateway("soak", "0-1")
    pid = server.proc.pid
    http = server.url.replace("ws://", "http://").removesuffix("/ws")
    try:
        for _ in range(20):  # warm-up: first sessions allocate caches and pools
            await one_session(server.url, 25, 0)
        start = snapshot(pid, http, "after warm-up")
        started = time.monotonic()
        ok = sum([await one_session(server.url, 25, 0) for _ in range(args.sequential)])
        print(
            f"{args.sequential} sequential sessions in {time.monotonic() - started:.1f} s, "
            f"{ok} ended with session.closed",
            flush=True,
        )
        after_seq = snapshot(pid, http, "after sequential")
        results = await asyncio.gather(
            *(one_session(server.url, 100, 0.02) for _ in range(args.concurrent)),
            return_exceptions=True,
        )
        ok2 = sum(r is True for r in results)
        print(f"{args.concurrent} concurrent sessions, {ok2} ended with session.closed", flush=True)
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
    if ok != args.sequential or ok2 != args.concurrent:
        failures.append("some sessions did not end with session.closed")
    print("\nPASS" if not failures else "\nFAIL:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
