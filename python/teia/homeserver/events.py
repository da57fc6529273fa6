"""Matrix events as data: canonical JSON, content hashes, reference-hash event IDs, the
redaction algorithm, Ed25519 signatures, and the client-facing form of a stored event.

Rooms here are version 10 in shape: event IDs are ``$`` + the URL-safe unpadded base64 of the
SHA-256 of the redacted event (so a redaction never changes an ID), ``redacts`` is a top-level
key, and ``m.room.create`` carries ``creator``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keys imports this module (base64 helpers)
    from teia.homeserver.keys import SigningKey, VerifyKey

__all__ = [
    "MAX_PDU_BYTES",
    "ROOM_VERSION",
    "CanonicalJsonError",
    "b64decode",
    "b64encode",
    "canonical_json",
    "check_canonical",
    "check_content_hash",
    "client_event",
    "compute_event_id",
    "content_hash",
    "pdu_for_wire",
    "redact",
    "sign_event",
    "sign_json",
    "signed_bytes",
    "verify_event_signature",
    "verify_signature",
]

ROOM_VERSION = "10"
MAX_PDU_BYTES = 65_536
"""The largest event, in canonical JSON, a room accepts (the Matrix limit)."""

_MAX_SAFE_INT = 2**53 - 1


class CanonicalJsonError(ValueError):
    """A value canonical JSON cannot hold: a float, an integer outside ±(2**53 - 1), a
    non-string key, or another type."""


def check_canonical(value: Any) -> None:
    """Raise `CanonicalJsonError` unless ``value`` has a canonical JSON form."""
    _check(value)


def _check(value: Any, depth: int = 0) -> None:
    if depth > 100:
        raise CanonicalJsonError("nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            raise CanonicalJsonError("integer out of range")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalJsonError("object keys must be strings")
            _check(item, depth + 1)
        return
    if isinstance(value, list):
        for item in value:
            _check(item, depth + 1)
        return
    raise CanonicalJsonError(f"{type(value).__name__} has no canonical JSON form")


def canonical_json(value: Any) -> bytes:
    """Matrix canonical JSON: sorted keys, no spaces, UTF-8, integers only."""
    _check(value)
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode("utf-8")


def b64encode(data: bytes, *, urlsafe: bool = False) -> str:
    """Unpadded base64, as Matrix writes hashes, keys and signatures."""
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode unpadded (or padded) standard or URL-safe base64; raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("base64 must be a string")
    padded = text + "=" * (-len(text) % 4)
    if "-" in text or "_" in text:
        return base64.urlsafe_b64decode(padded)
    return base64.b64decode(padded, validate=True)


def content_hash(event: dict[str, Any]) -> str:
    """The event's ``hashes.sha256``: over everything but unsigned, signatures and hashes."""
    skipped = ("unsigned", "signatures", "hashes", "event_id")
    stripped = {k: v for k, v in event.items() if k not in skipped}
    return b64encode(hashlib.sha256(canonical_json(stripped)).digest())


def check_content_hash(event: dict[str, Any]) -> bool:
    """Whether ``hashes.sha256`` matches the event's content."""
    hashes = event.get("hashes")
    return isinstance(hashes, dict) and hashes.get("sha256") == content_hash(event)


_KEPT_KEYS = frozenset(
    {
        "event_id", "type", "room_id", "sender", "state_key", "content", "hashes",
        "signatures", "depth", "prev_events", "auth_events", "origin_server_ts",
    }
)  # fmt: skip

_KEPT_CONTENT: dict[str, frozenset[str]] = {
    "m.room.member": frozenset({"membership", "join_authorised_via_users_server"}),
    "m.room.create": frozenset({"creator"}),
    "m.room.join_rules": frozenset({"join_rule", "allow"}),
    "m.room.power_levels": frozenset(
        [
            "ban",
            "events",
            "events_default",
            "kick",
            "redact",
            "state_default",
            "users",
            "users_default",
        ]
    ),
    "m.room.history_visibility": frozenset({"history_visibility"}),
}


def redact(event: dict[str, Any]) -> dict[str, Any]:
    """The event with everything a redaction removes removed (room version 10 rules)."""
    kept = {k: copy.deepcopy(v) for k, v in event.items() if k in _KEPT_KEYS}
    content = event.get("content")
    allowed = _KEPT_CONTENT.get(str(event.get("type")), frozenset())
    kept["content"] = (
        {k: copy.deepcopy(v) for k, v in content.items() if k in allowed}
        if isinstance(content, dict)
        else {}
    )
    return kept


def compute_event_id(event: dict[str, Any]) -> str:
    """``$`` + the reference hash: SHA-256 of the redacted event without signatures."""
    redacted = redact(event)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    redacted.pop("event_id", None)
    return "$" + b64encode(hashlib.sha256(canonical_json(redacted)).digest(), urlsafe=True)


def signed_bytes(value: dict[str, Any]) -> bytes:
    """What a signature covers: the canonical JSON without ``signatures`` and ``unsigned``."""
    return canonical_json({k: v for k, v in value.items() if k not in ("signatures", "unsigned")})


def sign_json(
    value: dict[str, Any], server_name: str, key_id: str, key: SigningKey
) -> dict[str, Any]:
    """Add ``server_name``'s signature under ``key_id`` to ``value`` (in place; returned)."""
    signature = b64encode(key.sign(signed_bytes(value)))
    value.setdefault("signatures", {}).setdefault(server_name, {})[key_id] = signature
    return value


def verify_signature(
    value: dict[str, Any], server_name: str, key_id: str, public: VerifyKey
) -> bool:
    """Whether ``value`` carries a valid signature of ``server_name`` under ``key_id``."""
    signatures = value.get("signatures")
    if not isinstance(signatures, dict):
        return False
    by_server = signatures.get(server_name)
    if not isinstance(by_server, dict) or not isinstance(by_server.get(key_id), str):
        return False
    try:
        signature = b64decode(by_server[key_id])
    except ValueError:
        return False
    return public.verify(signature, signed_bytes(value))


def _event_signed_part(event: dict[str, Any]) -> dict[str, Any]:
    redacted = redact(event)
    redacted.pop("event_id", None)
    return redacted


def sign_event(
    event: dict[str, Any], server_name: str, key_id: str, key: SigningKey
) -> dict[str, Any]:
    """Sign an event (its redacted form, so the signature survives a redaction); in place."""
    signature = b64encode(key.sign(signed_bytes(_event_signed_part(event))))
    event.setdefault("signatures", {}).setdefault(server_name, {})[key_id] = signature
    return event


def verify_event_signature(
    event: dict[str, Any], server_name: str, key_id: str, public: VerifyKey
) -> bool:
    """Whether ``event`` carries a valid signature of ``server_name`` under ``key_id``."""
    part = _event_signed_part(event)
    part["signatures"] = event.get("signatures")
    return verify_signature(part, server_name, key_id, public)


def pdu_for_wire(event: dict[str, Any]) -> dict[str, Any]:
    """A stored event as federation sends it: no ``event_id`` (it is the reference hash)."""
    return {k: v for k, v in event.items() if k not in ("event_id", "unsigned")}


def client_event(
    event: dict[str, Any], *, now_ms: int, unsigned: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The client-server form of a stored event (what ``/sync`` and ``/messages`` return)."""
    out: dict[str, Any] = {
        "event_id": event["event_id"],
        "room_id": event["room_id"],
        "sender": event["sender"],
        "type": event["type"],
        "content": event.get("content", {}),
        "origin_server_ts": event["origin_server_ts"],
    }
    if "state_key" in event:
        out["state_key"] = event["state_key"]
    if "redacts" in event:
        out["redacts"] = event["redacts"]
    extra = dict(unsigned or {})
    extra["age"] = max(0, now_ms - int(event["origin_server_ts"]))
    out["unsigned"] = extra
    return out
