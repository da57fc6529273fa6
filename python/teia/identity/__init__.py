"""Identities: Ed25519 keys, libp2p peer IDs, multiaddrs and the encrypted keystore.

The names most code needs are re-exported here: `Identity`, `PeerId`, `Multiaddr`, `verify`,
`KeyType`. Submodules: `keys` (libp2p key protobufs), `peer_id`, `multiaddr`, `varint`, `base58`,
`keystore` (the encrypted identity file) and `cli` (``teia init`` / ``teia id``).
"""

from __future__ import annotations

from teia.identity.keypair import Identity
from teia.identity.keys import KeyType, verify
from teia.identity.multiaddr import Multiaddr
from teia.identity.peer_id import PeerId

__all__ = ["Identity", "KeyType", "Multiaddr", "PeerId", "verify"]
