// The Node.js example from the public VoiceRun Transcribe docs ("Examples" page,
// "JavaScript (Node.js)"), verbatim except the URL and the key, which the test
// fills in. The stored copy of that page available to this project ends inside
// the `transcription.partial` case; the part below the marked line completes it
// in the page's own style (Final/Partial lines as in its Python example) and
// streams audio.raw in 20 ms chunks once the session is ready, as the example's
// "Ready - start sending audio" line invites.
import WebSocket from "ws";

const ws = new WebSocket("wss://transcribe.voicerun.com/ws", {
  headers: { Authorization: "Bearer YOUR_API_KEY" },
});

ws.on("message", (data) => {
  const msg = JSON.parse(data);

  switch (msg.type) {
    case "session.created":
      // Configure session
      ws.send(JSON.stringify({
        type: "session.update",
        session: {
          model: "nova-3",
          provider: "DEEPGRAM",
          language: "en",
          input_audio_format: "pcm16",
          sample_rate: 16000,
        },
      }));
      break;

    case "session.updated":
      console.log("Ready - start sending audio");
      break;

    case "transcription.partial":
      // ---- end of the stored copy of the docs; completed below ----
      console.log(`Partial: ${msg.text}`);
      break;

    case "transcription.completed":
      console.log(`Final: ${msg.text}`);
      break;

    case "error":
      console.error(`Error: ${msg.error.code}: ${msg.error.message}`);
      break;
  }
});

// Stream audio.raw (pcm16, 16 kHz, mono) in 20 ms chunks once the session is ready.
import fs from "fs";

ws.on("message", async (data) => {
  if (JSON.parse(data).type !== "session.updated") return;
  const audio = fs.readFileSync("audio.raw");
  for (let i = 0; i < audio.length; i += 640) {
    ws.send(JSON.stringify({ type: "audio.append", audio: audio.subarray(i, i + 640).toString("base64") }));
    await new Promise((resolve) => setTimeout(resolve, 20)); // 20ms pacing
  }
  ws.send(JSON.stringify({ type: "session.close" }));
});

ws.on("close", (code) => console.log(`Closed: ${code}`));
