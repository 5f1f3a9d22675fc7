"""The baseline: a bare ``websockets`` server doing the least a gateway must.

It parses each ``audio.append`` (JSON, then base64) and, like the NOOP
provider, answers every 3200 samples with a ``transcription.partial`` carrying
the sample count.  No auth, no session state, no engine: the physical limit
for Python on this machine, against which the gateway's cost is compared.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

from websockets.asyncio.server import ServerConnection, serve

EVERY_SAMPLES = 3200


async def handle(ws: ServerConnection) -> None:
    samples = 0
    nxt = EVERY_SAMPLES
    await ws.send(json.dumps({"type": "session.created", "session": {"id": "ts_000000000000"}}))
    async for raw in ws:
        msg = json.loads(raw)
        kind = msg.get("type")
        if kind == "audio.append":
            samples += len(base64.b64decode(msg["audio"], validate=True)) // 2
            if samples >= nxt:
                nxt += EVERY_SAMPLES
                await ws.send(
                    json.dumps(
                        {
                            "type": "transcription.partial",
                            "utterance_id": "utt_1",
                            "text": str(samples),
                        }
                    )
                )
        elif kind == "session.update":
            await ws.send(json.dumps({"type": "session.updated", "session": msg["session"]}))
        elif kind == "session.close":
            await ws.send(json.dumps({"type": "session.closed", "usage": {}}))
            await ws.close()


async def main(port: int) -> None:
    async with serve(handle, "127.0.0.1", port, max_size=2**20, ping_interval=None):
        print("ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    # argv: PORT [asyncio|uvloop]
    if sys.argv[2:] == ["uvloop"]:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    else:
        asyncio.run(main(int(sys.argv[1])))
