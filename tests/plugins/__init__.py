"""Provider plugins used by tests, loaded with TRANSCRIBE_PLUGINS."""
