"""Identities: Ed25519 keys, libp2p peer IDs, multiaddrs and the encrypted keystore."""
