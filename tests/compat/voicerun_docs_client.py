# The Python example from the public VoiceRun Transcribe docs ("Examples" page),
# verbatim except WS_URL and API_KEY, which the test fills in. It needs
# websockets 13 (the `extra_headers` keyword of the legacy client).
import asyncio
import base64
import json
import websockets

WS_URL = "wss://transcribe.voicerun.com"
API_KEY = "YOUR_API_KEY"


async def transcribe():
    async with websockets.connect(
        f"{WS_URL}/ws", extra_headers={"Authorization": f"Bearer {API_KEY}"}
    ) as ws:
        # Step 1: Receive session.created
        msg = json.loads(await ws.recv())
        print(f"Session: {msg['session']['id']}")

        # Step 2: Configure session
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "model": "nova-3",
                        "provider": "DEEPGRAM",
                        "language": "en",
                        "input_audio_format": "pcm16",
                        "sample_rate": 16000,
                    },
                }
            )
        )

        # Wait for session.updated
        msg = json.loads(await ws.recv())
        assert msg["type"] == "session.updated"

        # Step 3: Stream audio (20ms chunks)
        with open("audio.raw", "rb") as f:
            while chunk := f.read(640):  # 320 samples * 2 bytes
                await ws.send(
                    json.dumps({"type": "audio.append", "audio": base64.b64encode(chunk).decode()})
                )
                await asyncio.sleep(0.02)  # 20ms pacing

        # Step 4: Listen for transcription events
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "transcription.completed":
                print(f"Final: {msg['text']}")
            elif msg["type"] == "transcription.partial":
                print(f"Partial: {msg['text']}")

        # Step 5: Close
        await ws.send(json.dumps({"type": "session.close"}))


asyncio.run(transcribe())
