"""The relay role: a STUN/TURN server (RFC 8489, RFC 8656) whose data plane is in Rust.

- `teia.relay.stun`: the STUN/TURN message codec (sans-IO).
- `teia.relay.auth`: long-term and time-limited (REST) credentials, stateless nonces.
- `teia.relay.policy`: which peers may be relayed to, and quotas.
- `teia.relay.server`: the sans-IO TURN server core and the I/O adapter over the data plane.
- `teia.relay.service`: ``teia relay``.

Importing this package is light: the submodules are imported by who needs them.
"""
