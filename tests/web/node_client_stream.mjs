// Stream a raw pcm16 file through @transcribe-gateway/client in Node and print
// one JSON line per event. Usage: node node_client_stream.mjs <client index.js> <audio.raw>
// Env: GATEWAY_URL, and GATEWAY_KEY (header auth) or GATEWAY_TOKEN (auth message).
import fs from "node:fs";
import WebSocket from "ws";

const [clientPath, audioPath] = process.argv.slice(2);
const { TranscribeClient, TranscribeError } = await import(clientPath);
const print = (obj) => console.log(JSON.stringify(obj));

const client = new TranscribeClient({
  url: process.env.GATEWAY_URL,
  apiKey: process.env.GATEWAY_KEY,
  token: process.env.GATEWAY_TOKEN,
  auth: process.env.GATEWAY_TOKEN ? "message" : "header",
  WebSocket,
  session: { provider: "LOCAL", model: "whisper-tiny.en", sample_rate: 16000 },
});
for (const event of ["created", "updated", "partial", "completed", "speech_started", "speech_stopped", "closed"]) {
  client.on(event, (value) => print({ event, value }));
}
client.on("error", (err) => print({ event: "error", code: err.code, message: err.message }));

try {
  await client.connect();
} catch (err) {
  print({ event: "connect_failed", code: err instanceof TranscribeError ? err.code : "?", message: err.message });
  process.exit(3);
}
const audio = fs.readFileSync(audioPath);
const chunk = (client.sampleRate * 2 * 20) / 1000; // 20 ms of pcm16
for (let i = 0; i < audio.length; i += chunk) {
  client.sendPcm16(new Uint8Array(audio.subarray(i, i + chunk)));
  if ((i / chunk) % 10 === 9) await new Promise((r) => setTimeout(r, 40)); // 5x real time
}
const closed = await client.close();
print({ event: "done", value: closed });
