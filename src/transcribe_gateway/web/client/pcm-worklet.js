// AudioWorklet processor: microphone Float32 at the context rate -> pcm16 at the
// session rate, posted to the main thread in fixed chunks (20 ms by default).
// Runs on the audio rendering thread; no dependencies.
/* global sampleRate, registerProcessor, AudioWorkletProcessor */

class Pcm16Processor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 16000;
    this.chunk = Math.round((this.targetRate * (opts.chunkMs || 20)) / 1000);
    this.ratio = sampleRate / this.targetRate;
    this.t = 0; // read position; 0 is `prev`, k + 1 is input[k]
    this.prev = 0;
    this.buf = new Int16Array(this.chunk);
    this.fill = 0;
    this.running = true;
    this.port.onmessage = (ev) => {
      if (ev.data === "stop") this.running = false;
    };
  }

  push(sample) {
    const s = sample < -1 ? -1 : sample > 1 ? 1 : sample;
    this.buf[this.fill++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.fill === this.chunk) {
      const out = this.buf;
      this.port.postMessage(out.buffer, [out.buffer]);
      this.buf = new Int16Array(this.chunk);
      this.fill = 0;
    }
  }

  process(inputs) {
    const channels = inputs[0];
    if (!this.running) return false;
    if (!channels || channels.length === 0) return true;
    const input = channels[0]; // mono: the first channel
    const n = input.length;
    if (this.ratio === 1) {
      for (let i = 0; i < n; i++) this.push(input[i]);
      return true;
    }
    // Linear interpolation between neighbours (the context already runs at the
    // session rate where the browser allows it; this is the fallback).
    let t = this.t;
    while (t < n) {
      const i = Math.floor(t);
      const a = i === 0 ? this.prev : input[i - 1];
      this.push(a + (input[i] - a) * (t - i));
      t += this.ratio;
    }
    this.t = t - n;
    this.prev = input[n - 1];
    return true;
  }
}

registerProcessor("transcribe-pcm16", Pcm16Processor);
