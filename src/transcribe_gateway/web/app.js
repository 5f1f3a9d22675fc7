// The demo page: pickers from GET /v1/providers, a token from POST /demo/token
// (local development only), the microphone through the browser client.
import { TranscribeClient, TranscribeError, startMicrophone } from "./client/index.js";

const $ = (id) => document.getElementById(id);
const els = {
  provider: $("provider"), model: $("model"), start: $("start"), stop: $("stop"),
  status: $("status"), notice: $("notice"), partial: $("partial"), finals: $("finals"),
  latency: $("latency"), median: $("latency-median"), session: $("session"), errors: $("errors"),
};
let catalog = null;
let client = null;
let mic = null;
const latencies = [];

function setState(state, text) {
  document.body.dataset.state = state;
  els.status.textContent = text;
}

function showError(text) {
  const li = document.createElement("li");
  li.textContent = text;
  els.errors.append(li);
}

function fillModels() {
  const entry = catalog.providers.find((p) => p.name === els.provider.value);
  els.model.replaceChildren(...entry.models.map((m) => new Option(m.name, m.name)));
  if (entry.name === catalog.default.provider) els.model.value = catalog.default.model;
  els.notice.hidden = entry.available;
  els.notice.textContent = entry.available ? "" : `${entry.name} is not available here (${entry.reason}); `
    + (entry.substitute ? `sessions are served by ${entry.substitute}.` : "sessions will be refused.");
}

async function loadProviders() {
  const res = await fetch("/v1/providers");
  catalog = await res.json();
  els.provider.replaceChildren(...catalog.providers.map((p) => {
    const label = p.available ? p.name : `${p.name} (${p.substitute ? "→ " + p.substitute : "unavailable"})`;
    return new Option(label, p.name);
  }));
  els.provider.value = catalog.default.provider;
  fillModels();
  setState("idle", "ready");
}

async function getToken() {
  const res = await fetch("/demo/token", { method: "POST" });
  // No such route: 404, or 405 where the static mount answers a POST to that path.
  if (res.status === 404 || res.status === 405) {
    throw new Error("this server is not in the development profile: the demo token helper is off; "
      + "mint tokens from your backend with POST /v1/tokens");
  }
  // A proxy's or the static mount's plain-text or HTML reply is no JSON to parse.
  const isJson = (res.headers.get("content-type") || "").includes("application/json");
  const body = isJson ? await res.json().catch(() => null) : null;
  if (!res.ok || !body || typeof body.token !== "string") {
    throw new Error(body && body.error && body.error.message
      ? body.error.message
      : `token request failed (${res.status})`);
  }
  return body.token;
}

function addFinal(msg) {
  if (!msg.text.trim()) return;
  const li = document.createElement("li");
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = msg.text.trim();
  const timing = document.createElement("span");
  timing.className = "timing";
  const span = `${(msg.start_ms / 1000).toFixed(2)}–${(msg.end_ms / 1000).toFixed(2)} s`;
  timing.textContent = msg.latency_ms === null ? span : `${span} · ${msg.latency_ms} ms`;
  li.append(text, timing);
  els.finals.append(li);
  if (msg.latency_ms !== null) {
    latencies.push(msg.latency_ms);
    els.latency.textContent = `${msg.latency_ms} ms`;
    const sorted = [...latencies].sort((a, b) => a - b);
    els.median.textContent = `${sorted[Math.floor(sorted.length / 2)]} ms`;
  }
}

/** How an error reads on the page: a server's error with its code, as the `error` event shows it. */
function describe(err) {
  return err instanceof TranscribeError ? `${err.code}: ${err.message}` : String((err && err.message) || err);
}

function closedText(info) {
  let text = `closed (${info.code}${info.reason ? " " + info.reason : ""})`;
  if (info.session_reason && info.session_reason !== "client_close") {
    text += ` · ${info.session_reason.replace("_", " ")}`;
  }
  if (info.audio_seconds !== null) text += ` · ${info.audio_seconds.toFixed(1)} s of audio`;
  if (!info.finalized && info.code === 1000) {
    // close() stopped waiting: the server never confirmed it finished the audio.
    text += " · the server did not finish in time: the last words may be missing";
  }
  return text;
}

async function start() {
  els.start.disabled = true;
  setState("connecting", "connecting…");
  let own = null; // this attempt's client: `client` may be a newer one by the time a prompt is answered
  let failed = false; // the attempt failed: its error stays the status, not the close that follows
  let lastError = null; // the `error` event's line: connect()'s rejection repeats the server's error
  try {
    const token = await getToken();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    own = client = new TranscribeClient({
      url: `${scheme}://${location.host}/ws`,
      token,
      session: { provider: els.provider.value, model: els.model.value, sample_rate: 16000 },
    });
    own.on("partial", (msg) => { els.partial.textContent = msg.text; });
    own.on("completed", (msg) => { els.partial.textContent = ""; addFinal(msg); });
    own.on("error", (err) => { lastError = describe(err); showError(lastError); });
    own.on("closed", (info) => {
      if (client !== own) return; // an older session: the page shows a newer one
      if (!failed) setState(info.code === 1000 && info.finalized ? "closed" : "error", closedText(info));
      els.start.disabled = false;
      els.stop.disabled = true;
      if (mic) mic.stop();
      mic = null;
    });
    const effective = await own.connect();
    els.session.textContent = `${own.sessionId} · ${effective.provider}/${effective.model}`;
    const started = await startMicrophone(own); // may wait long on the permission prompt
    if (!own.isOpen || client !== own) {
      // The session ended meanwhile (idle timeout, server gone): its closed state stays shown.
      await started.stop();
      return;
    }
    mic = started;
    els.stop.disabled = false;
    setState("live", "listening");
  } catch (err) {
    failed = true;
    if (own) own.close();
    if (own && client !== own) return; // a newer session owns the page
    const text = describe(err);
    setState("error", text);
    if (text !== lastError) showError(text);
    els.start.disabled = false;
  }
}

async function stop() {
  els.stop.disabled = true;
  setState("closing", "finishing…");
  if (mic) await mic.stop();
  mic = null;
  if (client) await client.close();
}

els.provider.addEventListener("change", fillModels);
els.start.addEventListener("click", start);
els.stop.addEventListener("click", stop);
loadProviders().catch((err) => { setState("error", `cannot list providers: ${err}`); });
