"""The transport: WebSocket connections, HTTP routes on the same port, handshakes, dispatch."""
