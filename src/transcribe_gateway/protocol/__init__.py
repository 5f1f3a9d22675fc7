"""The Transcribe wire protocol, sans I/O: messages and the session state machine."""
