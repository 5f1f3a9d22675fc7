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
  /** @type {AudioContext} */
  let context;
  /** @type {MediaStreamAudioSourceNode} */
  let source;
  if (options.context) {
    context = options.context; // at its own rate: the worklet resamples
    source = context.createMediaStreamSource(stream);
  } else {
    try {
      // Let the browser resample (properly filtered) where it can.
      context = new AudioContext({ sampleRate: rate });
      source = context.createMediaStreamSource(stream);
    } catch {
      context = new AudioContext(); // e.g. Firefox refuses a rate unlike the device's
      source = context.createMediaStreamSource(stream);
    }
  }
  const url = options.workletUrl || new URL("./pcm-worklet.js", import.meta.url);
  await context.audioWorklet.addModule(String(url));
  const node = new AudioWorkletNode(context, "transcribe-pcm16", {
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
  let stopped = false;
  return {
    context,
    stream,
    async stop() {
      if (stopped) return;
      stopped = true;
      node.port.postMessage("stop");
      source.disconnect();
      node.port.onmessage = null;
      if (!options.stream) for (const track of stream.getTracks()) track.stop();
      if (!options.context) await context.close();
    },
  };
}
