"""Hostile clients against a real gateway process, by hand: the figures of docs/reliability.md.

    python fuzz/hostile.py --cycles 3000 --json test-artifacts/hostile.json

Starts ``transcribe-gateway serve`` (the test fixture's settings: auth timeout
1.5 s, idle timeout 3 s), measures a healthy probe session's latency alone,
then runs each attack of tests/reliability/hostile.py with the probe running
beside it, and prints per attack: connections tried, how they ended, the
probe's latency during the attack, and the server's RSS and open file
descriptors before and after (once its sessions are gone).  Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.conftest import SHARED_AUDIO, GatewayProcess  # noqa: E402
from tests.reliability import hostile  # noqa: E402

from transcribe_gateway.audio.files import read_audio  # noqa: E402


async def settle(server: GatewayProcess, wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        health = server.health()
        if not health["sessions"] and not any(health["streams"]["LOCAL"].values()):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # sockets closing in the kernel


def summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    return {
        "runs": len(latencies),
        "median_s": round(statistics.median(latencies), 2),
        "max_s": round(max(latencies), 2),
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    server = await asyncio.to_thread(GatewayProcess, "hostile-by-hand")
    rows: list[dict[str, Any]] = []
    try:
        pid = server.proc.pid
        probe = hostile.Probe(server.url, SHARED_AUDIO)
        for _ in range(2):  # warm-up: engines loaded, allocator at its steady state
            await probe.run_once()
        probe.latencies.clear()
        for _ in range(5):
            await probe.run_once()
        rows.append({"attack": "none (probe alone)", "probe": summary(probe.latencies)})
        speech = read_audio(SHARED_AUDIO / "sense_and_sensibility_01_austen_64kb-0870.wav")
        url, port, n = server.url, server.port, args.cycles
        attacks = [
            hostile.never_authenticate(url, args.slowloris),
            hostile.dribble_frame(url, max(5, args.slowloris // 10)),
            hostile.slow_http_upgrade("127.0.0.1", port, args.slowloris, duration=10),
            hostile.flood_audio(url, 4, seconds_of_audio=300),
            hostile.oversized_frames(url, 20, size=2 * 1024 * 1024),
            hostile.oversized_frames(url, 20, size=5 * 1024 * 1024),
            hostile.connect_cycles(url, n, concurrency=16),
            hostile.stop_reading(url, 4),
            hostile.vanish_mid_utterance(url, 8, speech[: 3 * 16000]),
        ]
        for attack in attacks:
            await settle(server)
            before = hostile.proc_stats(pid)
            probe.latencies.clear()
            name = attack.__qualname__.split(".")[0]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result: hostile.AttackResult = await probe.run_during(attack)
            await settle(server)
            after = hostile.proc_stats(pid)
            rows.append(
                {
                    "attack": result.name,
                    "connections": result.connections,
                    "outcomes": dict(result.outcomes),
                    "seconds": round(result.seconds, 1),
                    "probe": summary(probe.latencies),
                    "rss_mb": [round(before.rss_kb / 1024), round(after.rss_kb / 1024)],
                    "fds": [before.fds, after.fds],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        assert "connection failed" not in server.logs(), "an unexpected exception was logged"
    finally:
        code = await asyncio.to_thread(server.stop)
        rows.append({"server_exit_code": code})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=3000, help="connect/disconnect cycles")
    parser.add_argument("--slowloris", type=int, default=200, help="never-authenticating clients")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    figures = asyncio.run(main(options))
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures[-1]))
