// @ts-check
/**
 * Browser microphone capture for {@link TranscribeClient}: getUserMedia ->
 * AudioWorklet (pcm-worklet.js) -> pcm16 at the session's rate in 20 ms chunks.
 *
 * @module
 */

/**
 * @typedef {object} MicrophoneOptions
 * @property {MediaStream} [stream] an existing stream (default: getUserMedia({audio: true}))
 * @property {AudioContext} [context] an existing AudioContext to use (left open by `stop`);
 *   default: a new one at the session's rate
 * @property {string | URL} [workletUrl] where pcm-worklet.js is served (default: beside this file)
 * @property {number} [chunkMs] default 20
 */

/**
 * @typedef {object} Microphone
 * @property {AudioContext} context
 * @property {MediaStream} stream
 * @property {() => Promise<void>} stop stops capture and releases the microphone
 */

/**
 * Capture the microphone and stream it into an open client.
 * @param {import("./client.js").TranscribeClient} client a connected client
 * @param {MicrophoneOptions} [options]
 * @returns {Promise<Microphone>}
 */
export async function startMicrophone(client, options = {}) {
  const rate = client.sampleRate;
  const stream = options.stream || (await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
  }));
  /** @type {AudioContext | null} */
  let context = null;
  /** @type {MediaStreamAudioSourceNode | null} */
  let source = null;
  /** @type {AudioWorkletNode | null} */
  let node = null;
  try {
    if (options.context) {
      context = options.context; // at its own rate: the worklet resamples
      source = context.createMediaStreamSource(stream);
    } else {
      try {
        // Let the browser resample (properly filtered) where it can.
        context = new AudioContext({ sampleRate: rate });
        source = context.createMediaStreamSource(stream);
      } catch {
        // e.g. Firefox refuses a rate unlike the device's: that context is of no use.
        if (context) await closeQuietly(context);
        context = new AudioContext();
        source = context.createMediaStreamSource(stream);
      }
    }
    const url = options.workletUrl || new URL("./pcm-worklet.js", import.meta.url);
    await context.audioWorklet.addModule(String(url));
    node = new AudioWorkletNode(context, "transcribe-pcm16", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: rate, chunkMs: options.chunkMs || 20 },
    });
    node.port.onmessage = (ev) => {
      if (client.isOpen) client.sendPcm16(new Int16Array(ev.data));
    };
    source.connect(node);
    if (context.state === "suspended") await context.resume();
  } catch (err) {
    // Release what this call took: the microphone, the context it made, its nodes.
    if (node) node.port.onmessage = null;
    if (source) source.disconnect();
    if (!options.stream) for (const track of stream.getTracks()) track.stop();
    if (context && !options.context) await closeQuietly(context);
    throw err;
  }
  const ctx = context;
  const src = source;
  const worklet = node;
  let stopped = false;
  return {
    context: ctx,
    stream,
    async stop() {
      if (stopped) return;
      stopped = true;
      worklet.port.postMessage("stop");
      src.disconnect();
      worklet.port.onmessage = null;
      if (!options.stream) for (const track of stream.getTracks()) track.stop();
      if (!options.context) await ctx.close();
    },
  };
}

/** @param {AudioContext} context */
async function closeQuietly(context) {
  try {
    if (context.state !== "closed") await context.close();
  } catch {
    // already closed, or closing: nothing more to release
  }
}
