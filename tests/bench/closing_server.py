"""``bench/bare_server.py``'s protocol, but the server closes one session mid-run.

``python tests/bench/closing_server.py PORT``: its third session (the load
generator's warm-up session is the first) is closed with 1011 and no event
after 20 chunks, as the gateway closes a session that failed: the generator
must count it as an error, and go on.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import sys

from websockets.asyncio.server import ServerConnection, serve

CLOSED_SESSION = 2
CLOSE_AFTER_CHUNKS = 20
EVERY_SAMPLES = 3200
_sessions = itertools.count()


async def handle(ws: ServerConnection) -> None:
    me = next(_sessions)
    samples, nxt, chunks = 0, EVERY_SAMPLES, 0
    await ws.send(json.dumps({"type": "session.created", "session": {"id": f"ts_{me}"}}))
    async for raw in ws:
        msg = json.loads(raw)
        kind = msg.get("type")
        if kind == "audio.append":
            samples += len(base64.b64decode(msg["audio"])) // 2
            chunks += 1
            if me == CLOSED_SESSION and chunks == CLOSE_AFTER_CHUNKS:
                await ws.close(1011, "engine failed")
                return
            if samples >= nxt:
                nxt += EVERY_SAMPLES
                partial = {"type": "transcription.partial", "text": str(samples)}
                await ws.send(json.dumps(partial))
        elif kind == "session.update":
            await ws.send(json.dumps({"type": "session.updated", "session": msg["session"]}))
        elif kind == "session.close":
            await ws.send(json.dumps({"type": "session.closed", "usage": {}}))
            await ws.close()


async def main(port: int) -> None:
    async with serve(handle, "127.0.0.1", port, ping_interval=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
