// The JS client's session lifecycle in Node, printing one JSON line per event.
// Usage: node node_client_session.mjs <client index.js> connect <session JSON>
//        node node_client_session.mjs <client index.js> close-twice <session JSON>
//        node node_client_session.mjs <client index.js> rate-change <session JSON>
//        node node_client_session.mjs <client index.js> encoded <session JSON>
//        node node_client_session.mjs <client index.js> latency-cap <session JSON>
//        node node_client_session.mjs <client index.js> close-timeout <session JSON>
//        node node_client_session.mjs <client index.js> idle <session JSON>
//        node node_client_session.mjs <client index.js> drained <session JSON>
//        node node_client_session.mjs <client index.js> slow-reader <session JSON>
//        node node_client_session.mjs <client index.js> frozen-keepalive <session JSON>
//        node node_client_session.mjs <client index.js> frozen-timeouts <session JSON>
//        node node_client_session.mjs <client index.js> audio-after-close <session JSON>
//        node node_client_session.mjs <client index.js> audio-after-server-end <session JSON>
// Env: GATEWAY_URL, GATEWAY_KEY (header auth), CLIENT_OPTIONS (JSON, more client
// options), SERVER_PID (the frozen-* scenarios stop that process: the caller resumes it),
// HANG_MS (how long a wait may last before it reports a hang; default 60000).
import WebSocket from "ws";

const [clientPath, scenario, sessionJson] = process.argv.slice(2);
const { TranscribeClient, TranscribeError } = await import(clientPath);
const print = (obj) => console.log(JSON.stringify(obj));
const DEADLINE_MS = Number(process.env.HANG_MS || 60000); // only against a hang: every wait below ends on an event

const client = new TranscribeClient({
  url: process.env.GATEWAY_URL,
  apiKey: process.env.GATEWAY_KEY,
  WebSocket,
  session: JSON.parse(sessionJson),
  ...JSON.parse(process.env.CLIENT_OPTIONS || "{}"),
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
} else if (scenario === "slow-reader") {
  // 10 s of audio through the README's file loop to a key whose message rate (100/s:
  // 2x real time) makes the server read slower than the file is sent: what the kernel
  // buffers hold is invisible to bufferedAmount, and close()'s 2 s ran out while the
  // server still read the backlog (the last finals lost).
  let finals = 0;
  client.on("completed", () => { finals++; });
  await client.connect();
  const chunk = new Int16Array(client.sampleRate / 50).fill(1000);
  for (let i = 0; i < 500; i++) {
    await client.drained();
    client.sendPcm16(chunk);
  }
  const info = await client.close({ timeoutMs: 2000 });
  print({ event: "done", value: { ...info, finals } });
} else if (scenario === "frozen-keepalive") {
  // The README's file loop against a server that freezes (a host gone without a FIN):
  // drained() waited for ever; the keepalive must drop the server.
  await client.connect();
  process.kill(Number(process.env.SERVER_PID), "SIGSTOP");
  const started = Date.now();
  const chunk = new Int16Array(client.sampleRate / 50);
  const loop = async () => {
    for (let i = 0; i < 30000; i++) {
      await client.drained();
      if (!client.isOpen) return `stopped after ${i} chunks`;
      client.sendPcm16(chunk);
    }
    return "all sent";
  };
  const outcome = await Promise.race([loop(), hang("drained() never resolved")]);
  const info = await Promise.race([client.close(), hang("close() never resolved")]);
  print({ event: "done", value: { outcome, info, ms: Date.now() - started } });
} else if (scenario === "frozen-timeouts") {
  // Without keepalive, against a frozen server: drained({timeoutMs}) and close({timeoutMs})
  // must each give up in time (close() waited for the ws package's 30 s close handshake).
  await client.connect();
  process.kill(Number(process.env.SERVER_PID), "SIGSTOP");
  const chunk = new Int16Array(client.sampleRate / 50);
  let started = Date.now();
  const loop = async () => {
    try {
      for (let i = 0; i < 30000; i++) {
        await client.drained(undefined, { timeoutMs: 1000 });
        client.sendPcm16(chunk);
      }
      return "all sent";
    } catch (err) {
      return `rejected: ${err.code}`;
    }
  };
  const drained = await Promise.race([loop(), hang("drained() never resolved")]);
  const drainedMs = Date.now() - started;
  started = Date.now();
  const info = await Promise.race([client.close({ timeoutMs: 1000 }), hang("close() never resolved")]);
  print({ event: "done", value: { drained, drainedMs, info, closeMs: Date.now() - started } });
} else if (scenario === "audio-after-close") {
  // A microphone (as startMicrophone does: a chunk every 20 ms while isOpen) still
  // running while close() waits: each chunk came back as a session_closing error.
  await client.connect();
  const chunk = new Int16Array(client.sampleRate / 50).fill(1000);
  const mic = setInterval(() => { if (client.isOpen) client.sendPcm16(chunk); }, 20);
  await new Promise((resolve) => setTimeout(resolve, 1000));
  const closing = client.close({ timeoutMs: 1500 });
  const isOpen = client.isOpen;
  client.sendPcm16(chunk); // dropped, not sent (nor thrown)
  const info = await closing;
  clearInterval(mic);
  // Once closed, sending is an error again (a file loop must notice the end).
  let afterClosed = null;
  try { client.sendPcm16(chunk); } catch (err) { afterClosed = err.code; }
  print({ event: "done", value: { isOpen, info, afterClosed } });
} else if (scenario === "audio-after-server-end") {
  // The server ends the session itself (its idle timeout; hang-on-finalize keeps it
  // finishing) while a microphone sends: after its first session_closing, no more audio.
  await client.connect();
  await new Promise((resolve) => setTimeout(resolve, 3500)); // past the 3 s idle timeout
  const chunk = new Int16Array(client.sampleRate / 50).fill(1000);
  let sent = 0;
  let afterError = null;
  client.on("error", (err) => { if (err.code === "session_closing" && afterError === null) afterError = client.isOpen; });
  const mic = setInterval(() => { if (client.isOpen) { client.sendPcm16(chunk); sent++; } }, 20);
  const info = await Promise.race([closed, hang("no closed event")]);
  clearInterval(mic);
  print({ event: "done", value: { sent, isOpenAfterError: afterError, info } });
} else {
  throw new Error(`unknown scenario ${scenario}`);
}
process.exit(0);
