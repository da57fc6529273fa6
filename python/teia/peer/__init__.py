"""The peer: end-to-end encrypted chat over direct, relayed and stored paths (issue 7).

- `profile`: the profile directory (keystore, ``config.toml``, ``peer.db``) and `PeerConfig`;
- `db`: the SQLite database (history, contacts, sessions, prekeys, outbox; sealed at rest);
- `wire`: ``/teia/chat/1.0.0`` envelopes and acks, ``/teia/prekeys/1.0.0``, sealed envelopes;
- `safety`: safety numbers; `peer`: `Peer`, the SDK; `cli`: the ``teia`` subcommands.

See ``docs/peer.md``.
"""

from __future__ import annotations

from teia.peer.db import Contact, MessageRow
from teia.peer.peer import (
    AppHandler,
    AppMessage,
    Delivered,
    IdentityChanged,
    Message,
    Peer,
    PeerEvent,
    Read,
    Retracted,
    SessionStarted,
)
from teia.peer.profile import PeerConfig, Profile, default_profile_dir
from teia.peer.safety import format_safety_number, safety_number

__all__ = [
    "AppHandler",
    "AppMessage",
    "Contact",
    "Delivered",
    "IdentityChanged",
    "Message",
    "MessageRow",
    "Peer",
    "PeerConfig",
    "PeerEvent",
    "Profile",
    "Read",
    "Retracted",
    "SessionStarted",
    "default_profile_dir",
    "format_safety_number",
    "safety_number",
]
