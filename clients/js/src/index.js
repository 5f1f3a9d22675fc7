// @ts-check
export { TranscribeClient, TranscribeError, floatToPcm16 } from "./client.js";
export { startMicrophone } from "./microphone.js";
