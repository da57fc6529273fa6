"""Store-and-forward for offline peers (issue 6): replicated inboxes keyed by recipient hash.

- `messages`: the ``/teia/store/1.0.0`` wire format, strict and bounded;
- `auth`: owner-signed operations (fetch, ack, delete, bundle upload) and replay protection;
- `storage`: the node's SQLite database (envelopes, tombstones, bundles, quotas);
- `node`: `StoreNode`, the protocol served on a host, with batched writes and anti-entropy;
- `client`: `StoreClient`, one node at a time; `replication`: `ReplicatedStoreClient`, R nodes;
- `membership`: which nodes exist and which hold an inbox; `service`: ``teia store``.

See ``docs/store.md``.
"""

from __future__ import annotations

from teia.store.auth import inbox_for, sign_request
from teia.store.client import StoreClient
from teia.store.membership import (
    StaticMembership,
    StoreMembership,
    StoreNodeInfo,
    responsible_nodes,
)
from teia.store.messages import PROTOCOL, Envelope, Status
from teia.store.node import StoreNode, StoreSettings
from teia.store.replication import ReplicatedStoreClient
from teia.store.storage import InboxStore, StoreLimits

__all__ = [
    "PROTOCOL",
    "Envelope",
    "InboxStore",
    "ReplicatedStoreClient",
    "StaticMembership",
    "Status",
    "StoreClient",
    "StoreLimits",
    "StoreMembership",
    "StoreNode",
    "StoreNodeInfo",
    "StoreSettings",
    "inbox_for",
    "responsible_nodes",
    "sign_request",
]
