"""Homeserver-lite: the federated model, a Matrix-compatible homeserver (issue 10).

- `events`: canonical JSON, hashes, signatures, redaction, event IDs
- `auth`: power levels and membership rules
- `storage`: the repository over SQLite (default) or PostgreSQL
- `server`: accounts, rooms, events, sync, media (`Homeserver`)
- `api`: the client-server API as an ASGI app
- `federation`: server keys, signed requests, transactions, joins and backfill
- `service`: ``teia homeserver``
"""

from __future__ import annotations

__all__: list[str] = []
