// Compiled by `npm run check` only: usage that index.d.ts must accept (and reject).
import { TranscribeClient, TranscribeError, startMicrophone } from "./index.js";

async function demo(token: string): Promise<void> {
  const client = new TranscribeClient({
    url: "ws://localhost:8000/ws",
    token,
    session: { provider: "LOCAL", model: "whisper-tiny.en", sample_rate: 16000 },
  });
  client.on("completed", (m) => console.log(m.text.trim(), m.start_ms, m.latency_ms ?? -1));
  client.on("partial", (m) => console.log(m.text));
  client.on("error", (e: TranscribeError) => console.log(e.code, e.retryable, e.field ?? "-"));
  client.on("closed", (info) => console.log(info.code, info.audio_seconds, info.finalized, info.session_reason));
  const effective = await client.connect();
  console.log(effective, client.sessionId, client.sampleRate);
  const mic = await startMicrophone(client, { chunkMs: 20 });
  await client.drained();
  await client.drained(64 * 1024);
  await client.drained(undefined, { timeoutMs: 30000 });
  new TranscribeClient({ url: "ws://x", session: { provider: "LOCAL", model: "m" }, pingIntervalMs: 0, pingTimeoutMs: 5000 });
  const queued: number = client.bufferedAmount;
  client.sendPcm16(new Int16Array(320));
  client.sendFloat32(new Float32Array(320));
  await mic.stop();
  const closed = await client.close({ timeoutMs: 5000 });
  console.log(closed.reason, queued);
  if (!closed.finalized) console.log("gave up waiting", closed.session_reason === null);
  // @ts-expect-error: unknown events are a type error
  client.on("nonsense", () => {});
  // @ts-expect-error: a session needs a provider and a model
  new TranscribeClient({ url: "ws://x", session: { language: "en" } });
}
void demo;
