"""The Kademlia DHT: how a peer answers "where is peer X?" without a central directory.

Sans-IO building blocks, each importable on its own (this package imports nothing eagerly):
`teia.dht.messages` (the libp2p kad-dht ``/ipfs/kad/1.0.0`` wire messages and their framing),
`teia.dht.records` (signed peer records in libp2p signed envelopes) and `teia.dht.storage`
(the node's SQLite persistence). Formats and rules are written down in ``docs/dht.md``.
"""
