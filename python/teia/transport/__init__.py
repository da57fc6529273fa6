"""Transport: QUIC (aioquic's sans-IO core) over anyio UDP, with libp2p TLS peer authentication."""
