"""Host: connections, streams, multistream-select, protocol handlers and the connection manager."""
