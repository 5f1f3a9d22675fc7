"""A second baseline: the same work as ``bare_server.py`` on picows.

picows parses WebSocket frames in Cython and calls a listener per frame
(no coroutine per message).  This measures how much of the bare baseline's
cost is the ``websockets`` + asyncio layer rather than the JSON and base64
work every gateway must do (picows is a dependency of the gateway, for ``/ws``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

EVERY_SAMPLES = 3200


class Session(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.samples = 0
        self.next = EVERY_SAMPLES

    def on_ws_connected(self, transport: WSTransport) -> None:
        created = {"type": "session.created", "session": {"id": "ts_000000000000"}}
        transport.send(WSMsgType.TEXT, json.dumps(created).encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = json.loads(frame.get_payload_as_bytes())
        kind = msg.get("type")
        if kind == "audio.append":
            self.samples += len(base64.b64decode(msg["audio"], validate=True)) // 2
            if self.samples >= self.next:
                self.next += EVERY_SAMPLES
                partial = {"type": "transcription.partial", "utterance_id": "utt_1"}
                partial["text"] = str(self.samples)
                transport.send(WSMsgType.TEXT, json.dumps(partial).encode())
        elif kind == "session.update":
            updated = {"type": "session.updated", "session": msg["session"]}
            transport.send(WSMsgType.TEXT, json.dumps(updated).encode())
        elif kind == "session.close":
            transport.send(WSMsgType.TEXT, b'{"type": "session.closed", "usage": {}}')
            transport.send_close()
            transport.disconnect()


async def main(port: int) -> None:
    def listener(request: WSUpgradeRequest) -> Session:
        return Session()

    server = await ws_create_server(listener, "127.0.0.1", port, max_frame_size=2**20)
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    # argv: PORT [asyncio|uvloop]
    if sys.argv[2:] == ["uvloop"]:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    else:
        asyncio.run(main(int(sys.argv[1])))
