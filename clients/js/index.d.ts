// Type declarations for @transcribe-gateway/client (the sources are JSDoc-typed ESM).

export interface SessionConfig {
  /** `LOCAL`, `DEEPGRAM`, `OPENAI`, `CARTESIA`, `QWEN3`, `ELEVENLABS`, `SONIOX` */
  provider: string;
  /** e.g. `whisper-tiny.en`, `nova-3` */
  model: string;
  /** BCP-47, default `en` */
  language?: string;
  prompt?: string;
  /** Default `pcm16`; `mulaw`/`alaw` (G.711, one byte per sample): send the encoded bytes with `sendPcm16`. */
  input_audio_format?: "pcm16" | "mulaw" | "alaw";
  /** Hz, default 16000 */
  sample_rate?: number;
  /** ms of silence that ends an utterance */
  endpointing?: number;
  /** ms of silence that ends an utterance whose text does not yet end a sentence (semantic endpointing; `LOCAL` Whisper) */
  endpointing_unfinished?: number;
  /** The engine that takes over (with the audio since the last final) if this one fails. */
  fallback?: { provider: string; model: string };
  [extra: string]: unknown;
}

export interface ClientOptions {
  /** WebSocket URL, e.g. `ws://localhost:8000/ws` */
  url: string;
  /** Short-lived session token (`tst_...`) from `POST /v1/tokens`, or an API key (server side only). */
  token?: string;
  /** An API key: Node only, never in a web page. */
  apiKey?: string;
  session: SessionConfig;
  /** Where the credential goes; default `header` when `WebSocket` is given (Node `ws`), else `message`. */
  auth?: "header" | "message";
  /** WebSocket class; default `globalThis.WebSocket`. In Node pass `ws`'s default export. */
  WebSocket?: unknown;
  /** Default 15000. */
  connectTimeoutMs?: number;
  /** Node `ws` only: ms between keepalive pings; default 20000, 0 turns the keepalive off. */
  pingIntervalMs?: number;
  /**
   * Node `ws` only: the server is dropped (`closed` with 1011 `keepalive timeout: ...`) after
   * `pingIntervalMs + pingTimeoutMs` without a sign of life (no message, no pong, none of the
   * queued audio read); default 20000.
   */
  pingTimeoutMs?: number;
}

export interface Word {
  word: string;
  start_ms: number;
  end_ms: number;
  confidence?: number;
}

export interface Partial {
  type: "transcription.partial";
  utterance_id: string;
  text: string;
}

export interface Completed {
  type: "transcription.completed";
  utterance_id: string;
  text: string;
  start_ms: number;
  end_ms: number;
  words: Word[];
  /** Wall-clock ms from when the audio at `end_ms` was sent to when this final arrived. */
  latency_ms: number | null;
}

export interface SpeechEvent {
  type: "speech.started" | "speech.stopped";
  utterance_id?: string;
  /** speech.started: where the speech starts in the session's audio (ms) */
  audio_start_ms?: number;
  /** speech.stopped: where it ends (ms) */
  audio_end_ms?: number;
}

export interface ClosedInfo {
  /**
   * 1000 normal, 4001 unauthorized, 4029 over a limit, 1008 policy, 1011 internal error
   * (or, reason `keepalive timeout: ...`, the client dropped a server that showed no sign of life)
   */
  code: number;
  /** The WebSocket close reason. */
  reason: string;
  /**
   * Whether `session.closed` arrived (the server finished the audio). `false` with code
   * 1000 when `close()` gave up waiting (`timeoutMs`), or when the client closed a
   * session `connect()` gave up on.
   */
  finalized: boolean;
  /** `session.closed`'s reason, `null` without one. */
  session_reason: "client_close" | "idle_timeout" | "shutdown" | (string & {}) | null;
  /** From `session.closed`, when the server sent it. */
  audio_seconds: number | null;
}

export class TranscribeError extends Error {
  constructor(code: string, message: string, retryable?: boolean, field?: string | null);
  readonly code: string;
  readonly retryable: boolean;
  /** The offending path the server named (e.g. `session.sample_rate`), `null` if none. */
  readonly field: string | null;
}

export interface ClientEvents {
  created: { id: string };
  updated: Record<string, unknown>;
  partial: Partial;
  completed: Completed;
  speech_started: SpeechEvent;
  speech_stopped: SpeechEvent;
  error: TranscribeError;
  closed: ClosedInfo;
  message: Record<string, unknown>;
}

export class TranscribeClient {
  constructor(options: ClientOptions);
  readonly sessionId: string | null;
  readonly effective: Record<string, unknown> | null;
  readonly sampleRate: number;
  /** Wire format of the audio sent (from the session). */
  readonly inputAudioFormat: "pcm16" | "mulaw" | "alaw";
  /**
   * Whether the socket is open and the session takes audio: `false` once `close()` was
   * called or the server's `session_closing` error arrived.
   */
  readonly isOpen: boolean;
  /** Bytes sent but still queued on the socket (0 before `connect()`). */
  readonly bufferedAmount: number;
  /**
   * Resolves once fewer than `maxBytes` (default 1 MiB) are queued on the socket and, in Node
   * (`ws`), the server has read all but the last 5 s of audio sent; or once `isOpen` is false.
   * Await it between chunks to pace a file to the server. With `timeoutMs`, rejects with a
   * `TranscribeError` `timeout` if not drained by then.
   */
  drained(maxBytes?: number, options?: { timeoutMs?: number }): Promise<void>;
  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): () => void;
  /**
   * Open, authenticate and configure; resolves with the effective configuration.
   * Rejects with a `TranscribeError` (the socket closed): `unauthorized`, `over_limit`,
   * the server's `invalid_session_config` / `provider_unavailable` / `provider_error`
   * (its message and `retryable`), `timeout`, `closed`. With a `fallback`, the
   * `provider_error` of the switch is not a refusal: it resolves with the fallback's config.
   */
  connect(): Promise<Record<string, unknown>>;
  /**
   * One chunk in the session's `input_audio_format` (pcm16, or mu-law/A-law bytes), at its rate.
   * Dropped once `close()` was called or the server's `session_closing` arrived; throws a
   * `TranscribeError` `client_error` when the connection is not open otherwise.
   */
  sendPcm16(chunk: Int16Array | ArrayBuffer | Uint8Array): void;
  sendFloat32(samples: Float32Array): void;
  update(session: SessionConfig): void;
  /**
   * `session.close`: resolves once the server finalized and closed the socket (every call,
   * the same promise); no audio is sent from the call on. `timeoutMs` (default 20000) is an
   * inactivity timeout: after that long without a message from the server (in Node `ws`,
   * while the server still reads audio sent before `session.close`, without any sign of
   * life) the client drops the socket (close code 1000) and resolves at once with
   * `finalized: false`.
   */
  close(options?: { timeoutMs?: number }): Promise<ClosedInfo>;
}

export function floatToPcm16(samples: Float32Array): Int16Array;

export interface MicrophoneOptions {
  stream?: MediaStream;
  /** An existing AudioContext (left open by `stop`); default: a new one at the session's rate. */
  context?: AudioContext;
  workletUrl?: string | URL;
  chunkMs?: number;
}

export interface Microphone {
  context: AudioContext;
  stream: MediaStream;
  stop(): Promise<void>;
}

/** Capture the microphone (AudioWorklet) and stream pcm16 into a connected client. */
export function startMicrophone(client: TranscribeClient, options?: MicrophoneOptions): Promise<Microphone>;
