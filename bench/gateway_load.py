"""Gateway capacity: N real-time sessions on one core, against a bare websockets baseline.

Run by hand (never in CI), from the repository root:

    .venv/bin/pip install -e '.[bench]'   # py-spy; picows (a dependency) drives the load
    .venv/bin/python bench/gateway_load.py --sessions 100,250,500,1000 --seconds 10 \
        --runs 3 --client picows \
        --servers bare,bare-uvloop,bare-picows,bare-picows-uvloop,gateway-asyncio,gateway

For each N it runs, in the same run and on the same cores, the servers named
in ``--servers`` (see ``SERVERS``): the bare baseline server
(``bench/bare_server.py``: JSON + base64 decode only, on asyncio's loop or
uvloop; ``bench/bare_picows.py``: the same on picows, a Cython WebSocket
layer) and the gateway serving the ``NOOP`` provider
(``bench/noop_provider.py``, loaded through the plugin interface; or, for
``gateway-local``, the embedded engine on the generator's silence: its
per-chunk cost, with no answers to time), each
pinned to core 0 with ``taskset``, runs interleaved, medians reported; this
load generator pins itself to core 1 (``--client picows`` keeps its own
cost low enough to drive 1000 sessions from one core).  Each session streams 20 ms pcm16 chunks
at real-time pace; the server answers every 10th chunk with a partial naming
the samples it has seen, so each answer's latency is measured from the send of
the chunk it covers.  Reported per N: latency p50/p99, server CPU (cores),
server CPU per chunk, RSS per session (each run on a fresh server process,
after one session has warmed it: RSS with the N sessions streaming less RSS
before, per session opened), errors (failed opens: refused, or no
``session.created``/``session.updated`` within ``SETUP_TIMEOUT_S``; ``error``
events; and sessions that did not end
with ``session.closed``: one the server closed, with a failure's close code and
no event, counts), and whether the generator kept its schedule (if it did not,
that run's latencies are its own lateness: the medians leave them out).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.conftest import free_port  # noqa: E402

KEY = "bench-key"
CHUNK_MS = 20
CHUNK_SAMPLES = 320
TICK_GROUPS = 10
"""Sessions send in 10 phase groups, 2 ms apart, as independent clients would."""
SETUP_TIMEOUT_S = 30.0
"""How long an opening session waits for each of ``session.created`` and
``session.updated`` (an open that gets neither counts as an error, never hangs)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


SESSION_CONFIG: dict[str, Any] = {
    "provider": "NOOP",
    "model": "noop",
    "input_audio_format": "pcm16",
    "sample_rate": 16000,
}
LOCAL_CONFIG = {**SESSION_CONFIG, "provider": "LOCAL", "model": "whisper-tiny.en"}
"""The embedded engine on the generator's silence: its per-chunk path (VAD, no decode)."""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    session: dict[str, Any] = field(default_factory=lambda: SESSION_CONFIG)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def start_gateway(
    name: str,
    cpu: str,
    loop: str = "auto",
    root: Path = ROOT,
    session: dict[str, Any] = SESSION_CONFIG,
) -> Server:
    """The gateway from the checkout at ``root`` (another one: a before/after comparison)."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}",
        "TRANSCRIBE_EVENT_LOOP": loop,
        "TRANSCRIBE_API_KEYS": KEY,
        "TRANSCRIBE_PLUGINS": "bench.noop_provider:NoopSTT",
        "TRANSCRIBE_LOG_LEVEL": "warning",
        "TRANSCRIBE_LOCAL_WORKERS": "1",
        # Admission caps LOCAL sessions at 8 per worker for decoding; on silence
        # (gateway-local) nothing is decoded, so every session is admitted.
        "TRANSCRIBE_LOCAL_MAX_SESSIONS_PER_WORKER": "1000",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = ["taskset", "-c", cpu, sys.executable, "-m", "transcribe_gateway", "serve"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, cwd=root)
    wait_port(port, proc)
    return Server(name, proc, f"ws://127.0.0.1:{port}/ws", session)


def before_checkout() -> Path:
    path = os.environ.get("GATEWAY_BEFORE")
    if not path:
        raise SystemExit("gateway-before needs GATEWAY_BEFORE=<a checkout of an earlier commit>")
    return Path(path)


def start_bare(
    name: str, cpu: str, loop: str = "asyncio", script: str = "bare_server.py"
) -> Server:
    port = free_port()
    cmd = ["taskset", "-c", cpu, sys.executable, str(ROOT / "bench" / script), str(port), loop]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_port(port, proc)
    return Server(name, proc, f"ws://127.0.0.1:{port}/ws")


SERVERS: dict[str, Callable[[str], Server]] = {
    "bare": lambda cpu: start_bare("bare", cpu),
    "bare-uvloop": lambda cpu: start_bare("bare-uvloop", cpu, loop="uvloop"),
    "bare-picows": lambda cpu: start_bare("bare-picows", cpu, script="bare_picows.py"),
    "bare-picows-uvloop": lambda cpu: start_bare(
        "bare-picows-uvloop", cpu, loop="uvloop", script="bare_picows.py"
    ),
    # An earlier version, for before/after figures: GATEWAY_BEFORE=<checkout>
    # (e.g. `git worktree add /tmp/before <commit>`), run with this environment.
    "gateway-before": lambda cpu: start_gateway("gateway-before", cpu, root=before_checkout()),
    "gateway-asyncio": lambda cpu: start_gateway("gateway-asyncio", cpu, loop="asyncio"),
    "gateway": lambda cpu: start_gateway("gateway", cpu),  # as shipped: uvloop where installed
    # LOCAL sessions on silence: the embedded engine's per-chunk cost (Silero VAD, no decode).
    "gateway-local": lambda cpu: start_gateway("gateway-local", cpu, session=LOCAL_CONFIG),
    "gateway-before-local": lambda cpu: start_gateway(
        "gateway-before-local", cpu, root=before_checkout(), session=LOCAL_CONFIG
    ),
}


@dataclass
class Level:
    server: str
    sessions: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    chunks: int = 0
    cpu_s: float = 0.0
    window_s: float = 0.0
    rss_per_session_kb: float = 0.0
    late_ticks: int = 0
    ticks: int = 0

    def _quantile_ms(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 if lat else float("nan")

    @property
    def p50_ms(self) -> float:
        return self._quantile_ms(0.5)

    @property
    def p99_ms(self) -> float:
        return self._quantile_ms(0.99)

    @property
    def cpu_per_chunk(self) -> float:
        return self.cpu_s / self.chunks * 1e6 if self.chunks else float("nan")

    @property
    def kept_pace(self) -> bool:
        return self.late_ticks <= self.ticks * 0.01

    def row(self) -> str:
        cores = self.cpu_s / self.window_s if self.window_s else 0
        kept = "yes" if self.kept_pace else f"no ({self.late_ticks} late)"
        return (
            f"| {self.sessions} | {self.server} | {self.p50_ms:.1f} | {self.p99_ms:.1f} | "
            f"{cores:.2f} | {self.cpu_per_chunk:.1f} | {self.rss_per_session_kb:.0f} | "
            f"{self.errors} | {kept} |"
        )


class SessionRefused(RuntimeError):
    """The server refused a session while it opened (``error``, or a close)."""


def check_setup_reply(msg: dict[str, Any] | None, expected: str) -> None:
    """Raise :class:`SessionRefused` unless ``msg`` is the ``expected`` event
    (``None``: the connection closed first)."""
    if msg is None:
        raise SessionRefused(f"closed before {expected}")
    if msg.get("type") != expected:
        raise SessionRefused(f"{msg} instead of {expected}")


class Client:
    """One generated session: what it sent when, and the latencies of its answers."""

    def __init__(self, level: Level, slots: int) -> None:
        self.level = level
        self.sent_at = [0.0] * slots
        self.sent = 0
        self.measure = False
        self.closed = False
        """``session.closed`` came: the session ended as the client asked."""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, raw: str | bytes) -> None:
        msg = json.loads(raw)
        if msg["type"] == "transcription.partial":
            chunk = int(msg["text"]) // CHUNK_SAMPLES - 1
            if self.measure and 0 <= chunk < len(self.sent_at):
                self.level.latencies.append(time.perf_counter() - self.sent_at[chunk])
        elif msg["type"] == "error":
            self.level.errors += 1
        elif msg["type"] == "session.closed":
            self.closed = True

    async def send(self, text: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class WebsocketsClient(Client):
    def __init__(self, ws: websockets.ClientConnection, level: Level, slots: int) -> None:
        super().__init__(level, slots)
        self.ws = ws
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                self.on_message(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.done.set_result(None)

    async def send(self, text: str) -> None:
        # A session the server closed takes nothing more; it did not end with
        # session.closed, and run_level counts it as an error for that (as the
        # picows client's, whose send to a closed transport is a no-op).
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.ws.send(text)

    async def close(self) -> None:
        await self.ws.close()

    @classmethod
    async def open(cls, server: Server, level: Level, slots: int) -> Client:
        ws = await websockets.connect(
            server.url,
            additional_headers={"Authorization": f"Bearer {KEY}"},
            ping_interval=None,
            max_queue=None,
        )
        try:
            created = json.loads(await asyncio.wait_for(ws.recv(), SETUP_TIMEOUT_S))
            check_setup_reply(created, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": server.session}))
            updated = json.loads(await asyncio.wait_for(ws.recv(), SETUP_TIMEOUT_S))
            check_setup_reply(updated, "session.updated")
        except BaseException:
            await ws.close()
            raise
        return cls(ws, level, slots)


async def open_picows_client(server: Server, level: Level, slots: int) -> Client:
    """The same session on picows: a generator cheap enough to drive 1000 sessions."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    class PicowsClient(Client, WSListener):  # type: ignore[misc]
        def __init__(self) -> None:
            Client.__init__(self, level, slots)
            self.setup: asyncio.Queue[bytes | None] = asyncio.Queue()
            """The frames before ``ready``; ``None`` once the connection closed."""
            self.ready = False
            self.transport: WSTransport | None = None

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                raw = frame.get_payload_as_bytes()
                if self.ready:
                    self.on_message(raw)
                else:
                    self.setup.put_nowait(raw)
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            if not self.ready:  # a session refused at open: its setup waits no more
                self.setup.put_nowait(None)
            if not self.done.done():
                self.done.set_result(None)

        async def setup_reply(self, expected: str) -> None:
            raw = await asyncio.wait_for(self.setup.get(), SETUP_TIMEOUT_S)
            check_setup_reply(None if raw is None else json.loads(raw), expected)

        async def send(self, text: str) -> None:
            assert self.transport is not None
            self.transport.send(WSMsgType.TEXT, text.encode())

        async def close(self) -> None:
            if self.transport is not None:
                self.transport.disconnect()

    transport, listener = await ws_connect(
        PicowsClient, server.url, extra_headers={"Authorization": f"Bearer {KEY}"}
    )
    client = listener
    assert isinstance(client, PicowsClient)
    client.transport = transport
    try:
        # A session refused at open gets an error, then a close (4029, 1012):
        # raised here, and counted as an error as the websockets client's.
        await client.setup_reply("session.created")
        await client.send(json.dumps({"type": "session.update", "session": server.session}))
        await client.setup_reply("session.updated")
    except BaseException:
        transport.disconnect()
        raise
    client.ready = True
    return client


CLIENTS: dict[str, Callable[[Server, Level, int], Awaitable[Client]]] = {
    "websockets": WebsocketsClient.open,
    "picows": open_picows_client,
}


async def run_level(
    server: Server, n: int, seconds: float, warmup: float, client: str = "websockets"
) -> Level:
    level = Level(server.name, n)
    slots = int((seconds + warmup + 5) * 1000 / CHUNK_MS)
    # One session first, so that what any first session allocates (imports, caches)
    # is not counted as the N sessions' memory.
    first = await CLIENTS[client](server, Level(server.name, 1), slots)
    await first.send(json.dumps({"type": "session.close"}))
    await asyncio.wait([first.done], timeout=10)
    await first.close()
    await asyncio.sleep(0.5)
    rss_before = rss_mb(server.proc.pid)
    fds_before = open_fds(server.proc.pid)
    clients: list[Client] = []
    for i in range(0, n, 50):  # open in batches, as a crowd arriving would
        batch = await asyncio.gather(
            *(CLIENTS[client](server, level, slots) for _ in range(min(50, n - i))),
            return_exceptions=True,
        )
        for c in batch:
            if isinstance(c, Client):
                clients.append(c)
            else:
                level.errors += 1
    payload = json.dumps(
        {"type": "audio.append", "audio": base64.b64encode(bytes(CHUNK_SAMPLES * 2)).decode()}
    )
    groups = [clients[g::TICK_GROUPS] for g in range(TICK_GROUPS)]
    start = time.perf_counter() + 0.1
    end = start + warmup + seconds
    cpu0 = window0 = 0.0
    tick = 0
    measuring = False
    while True:
        for g, group in enumerate(groups):
            due = start + tick * CHUNK_MS / 1000 + g * CHUNK_MS / 1000 / TICK_GROUPS
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif measuring and delay < -CHUNK_MS / 1000:
                level.late_ticks += 1
            for c in group:
                # Stamped as each is sent: a group's later sessions are sent a
                # little after its first (up to 1-2 ms at 100 per group).
                c.sent_at[c.sent] = time.perf_counter()
                c.sent += 1
                await c.send(payload)
            if measuring:
                level.chunks += len(group)
                level.ticks += 1
        tick += 1
        now = time.perf_counter()
        if not measuring and now >= start + warmup:
            measuring = True
            for c in clients:
                c.measure = True
            cpu0, window0 = cpu_seconds(server.proc.pid), now
            # Per session opened: one refused at open holds nothing (counted in errors).
            level.rss_per_session_kb = (
                (rss_mb(server.proc.pid) - rss_before) * 1024 / max(1, len(clients))
            )
        if now >= end:
            break
    level.cpu_s = cpu_seconds(server.proc.pid) - cpu0
    level.window_s = time.perf_counter() - window0
    with_close = json.dumps({"type": "session.close"})
    for c in clients:
        await c.send(with_close)  # to one the server closed, nothing: counted below
    await asyncio.wait([c.done for c in clients], timeout=30)
    # A session the server closed (a failure closes with no error event), or that
    # did not end in time, did not end as asked: an error too.
    level.errors += sum(not c.closed for c in clients)
    for c in clients:
        await c.close()
    await asyncio.sleep(1.0)
    fds_after = open_fds(server.proc.pid)
    if fds_after > fds_before + 5:
        print(f"  warning: {server.name} holds {fds_after - fds_before} more fds after closing")
    return level


def median_row(rows: list[Level]) -> str:
    """One table row: each figure the median over the runs of one (server, sessions);
    latencies over the runs whose generator kept pace (all of them if none did)."""
    med = statistics.median
    cores = med(r.cpu_s / r.window_s for r in rows if r.window_s)
    per_chunk = med(r.cpu_s / r.chunks * 1e6 for r in rows if r.chunks)
    kept = sum(r.kept_pace for r in rows)
    # A run whose generator fell behind timed its own lateness: not a server figure.
    timed = [r for r in rows if r.kept_pace] or rows
    return (
        f"| {rows[0].sessions} | {rows[0].server} | {med(r.p50_ms for r in timed):.1f} | "
        f"{med(r.p99_ms for r in timed):.1f} | {cores:.2f} | {per_chunk:.1f} | "
        f"{med(r.rss_per_session_kb for r in rows):.0f} | {sum(r.errors for r in rows)} | "
        f"{kept}/{len(rows)} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", default="100,250,500,1000")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--runs", type=int, default=3, help="runs per level; medians reported")
    parser.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="websockets",
        help="the generator's WebSocket library (picows: cheaper, for 1000 sessions)",
    )
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument(
        "--servers", default="bare,gateway", help=f"comma-separated, of {', '.join(SERVERS)}"
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})
    levels = [int(n) for n in args.sessions.split(",")]
    wanted = args.servers.split(",")
    rows: list[Level] = []
    # Runs interleave servers at each level, so drift on a shared machine hits all
    # alike; each run on a fresh server process, so that memory per session reads
    # what N live sessions hold, not memory an earlier run's sessions freed.
    for n in levels:
        for run in range(args.runs):
            for name in wanted:
                server = SERVERS[name](args.server_cpu)
                try:
                    level = await run_level(server, n, args.seconds, args.warmup, args.client)
                finally:
                    server.stop()
                rows.append(level)
                print(f"run {run + 1}: {level.row()}", flush=True)
    print(
        f"\n## Gateway capacity ({os.cpu_count()} cores; server on core {args.server_cpu}; "
        f"medians of {args.runs} runs)\n"
    )
    print(
        "| sessions | server | p50 ms | p99 ms | server CPU (cores) | CPU us/chunk | "
        "RSS KiB/session | errors | generator kept pace (runs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in levels:
        for name in wanted:
            print(median_row([r for r in rows if r.sessions == n and r.server == name]))
    print("\nCPU per chunk against each baseline (median of the per-run ratios):\n")
    for n in levels:
        for base in (b for b in wanted if b.startswith("bare")):
            for name in (g for g in wanted if not g.startswith("bare")):
                ratios = [
                    g.cpu_per_chunk / b.cpu_per_chunk
                    for b, g in zip(
                        (r for r in rows if r.sessions == n and r.server == base),
                        (r for r in rows if r.sessions == n and r.server == name),
                        strict=True,
                    )
                    if b.chunks and g.chunks
                ]
                if ratios:
                    print(f"- {n} sessions: {name} = {statistics.median(ratios):.2f}x {base}")


if __name__ == "__main__":
    try:  # the generator on uvloop too, so that it keeps pace at the higher levels
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
