// The JS client's session lifecycle in Node, printing one JSON line per event.
// Usage: node node_client_session.mjs <client index.js> connect <session JSON>
//        node node_client_session.mjs <client index.js> close-twice <session JSON>
//        node node_client_session.mjs <client index.js> rate-change <session JSON>
//        node node_client_session.mjs <client index.js> encoded <session JSON>
//        node node_client_session.mjs <client index.js> latency-cap <session JSON>
//        node node_client_session.mjs <client index.js> close-timeout <session JSON>
//        node node_client_session.mjs <client index.js> idle <session JSON>
//        node node_client_session.mjs <client index.js> drained <session JSON>
// Env: GATEWAY_URL, GATEWAY_KEY (header auth).
import WebSocket from "ws";

const [clientPath, scenario, sessionJson] = process.argv.slice(2);
const { TranscribeClient, TranscribeError } = await import(clientPath);
const print = (obj) => console.log(JSON.stringify(obj));
const DEADLINE_MS = 60000; // only against a hang: every wait below ends on an event

const client = new TranscribeClient({
  url: process.env.GATEWAY_URL,
  apiKey: process.env.GATEWAY_KEY,
  WebSocket,
  session: JSON.parse(sessionJson),
});
client.on("error", (err) => print({ event: "error", code: err.code, message: err.message, retryable: err.retryable, field: err.field }));
const closed = new Promise((resolve) => client.on("closed", (info) => { print({ event: "closed", value: info }); resolve(info); }));
const hang = (what) => new Promise((resolve) => setTimeout(() => resolve(`hang: ${what}`), DEADLINE_MS).unref());
const nextTask = () => new Promise((resolve) => setImmediate(resolve));

if (scenario === "connect") {
  try {
    const effective = await client.connect();
    print({ event: "connected", value: effective });
    await client.close();
  } catch (err) {
    print({
      event: "connect_failed",
      code: err instanceof TranscribeError ? err.code : "?",
      message: err.message,
      retryable: err.retryable,
      field: err.field,
    });
    // The client closes the socket it gave up on: `closed` follows.
    const outcome = await Promise.race([closed.then(() => "closed"), hang("no closed event")]);
    print({ event: "after_failure", value: outcome, isOpen: client.isOpen });
  }
} else if (scenario === "close-twice") {
  await client.connect();
  const settled = [];
  const first = client.close().then((info) => { settled.push("first"); return info; });
  const second = client.close().then((info) => { settled.push("second"); return info; });
  await Promise.race([closed, hang("no closed event")]);
  // The close event resolves every close() promise; their callbacks run before the next task.
  await nextTask();
  print({ event: "settled", value: settled.sort() });
  if (settled.length === 2) print({ event: "infos", value: await Promise.all([first, second]) });
  print({ event: "third", value: await client.close() }); // after the close: at once
} else if (scenario === "rate-change") {
  // 1 s at the session's rate, then 1 s at half of it, each paced in real time:
  // every final's latency_ms is timed from the chunk that holds its end_ms.
  client.on("completed", (value) => print({ event: "completed", value }));
  await client.connect();
  const sendSecond = async () => {
    for (let i = 0; i < 50; i++) {
      client.sendPcm16(new Int16Array(client.sampleRate / 50));
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  await sendSecond();
  const updated = new Promise((resolve) => client.on("updated", resolve));
  const session = JSON.parse(sessionJson);
  client.update({ ...session, sample_rate: session.sample_rate / 2 });
  await Promise.race([updated, hang("no session.updated")]);
  await sendSecond();
  print({ event: "done", value: await client.close() });
} else if (scenario === "encoded") {
  // 2 s of G.711 silence (mulaw or alaw: one byte per sample), paced in real time:
  // latency_ms is timed from the chunk that holds each final's end_ms.
  client.on("completed", (value) => print({ event: "completed", value }));
  await client.connect();
  const silence = JSON.parse(sessionJson).input_audio_format === "alaw" ? 0xd5 : 0xff;
  for (let i = 0; i < 100; i++) {
    client.sendPcm16(new Uint8Array(client.sampleRate / 50).fill(silence));
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  print({ event: "done", value: await client.close() });
} else if (scenario === "latency-cap") {
  // 2 s, then 60 s more in the same task: the client's 3000-entry send history
  // drops the first 2 s before any final is handled.
  client.on("completed", (value) => print({ event: "completed", value }));
  await client.connect();
  const chunk = new Int16Array(client.sampleRate / 50).fill(1000);
  for (let i = 0; i < 3100; i++) client.sendPcm16(chunk);
  print({ event: "done", value: await client.close() });
} else if (scenario === "close-timeout") {
  // A server still finalizing when close() stops waiting for it.
  await client.connect();
  for (let i = 0; i < 60; i++) client.sendPcm16(new Int16Array(client.sampleRate / 50));
  await new Promise((resolve) => setTimeout(resolve, 300));
  print({ event: "done", value: await client.close({ timeoutMs: 1000 }) });
} else if (scenario === "idle") {
  // No audio: the server ends the session at its idle timeout.
  await client.connect();
  print({ event: "done", value: await Promise.race([closed, hang("no closed event")]) });
} else if (scenario === "drained") {
  // 10 minutes of 20 ms chunks, as fast as the socket takes them: unpaced, the
  // ws queue grows to megabytes while the engine works through the audio.
  const limit = 64 * 1024;
  await client.connect();
  const chunk = new Int16Array(client.sampleRate / 50);
  let most = 0;
  for (let i = 0; i < 30000; i++) {
    await client.drained(limit);
    client.sendPcm16(chunk);
    most = Math.max(most, client.bufferedAmount);
  }
  const frame = JSON.stringify({ type: "audio.append", audio: Buffer.from(chunk.buffer).toString("base64") }).length;
  print({ event: "stream", value: { most, limit, frame } });
  print({ event: "done", value: await client.close() });
} else {
  throw new Error(`unknown scenario ${scenario}`);
}
process.exit(0);
