"""The asyncio server: HTTP app, WebSocket connections, auth, shutdown."""
