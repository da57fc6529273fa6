"""Identities: Ed25519 keys, libp2p peer IDs, multiaddrs and the encrypted keystore.

The names most code needs are re-exported here: `Identity`, `PeerId`, `verify`, `KeyType`.
"""

from __future__ import annotations

from teia.identity.keypair import Identity
from teia.identity.keys import KeyType, verify
from teia.identity.peer_id import PeerId

__all__ = ["Identity", "KeyType", "PeerId", "verify"]
