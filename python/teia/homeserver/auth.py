"""Room authorization: who may send what, from a room's current state and its power levels.

These are the Matrix authorization rules in the form homeserver-lite applies them: every event
(local or received over federation) is checked against the room's *current* state, not against
the state at the event's ``auth_events`` (see docs/homeserver.md for what that simplifies).
Pure functions: a state map in, `MatrixError` (``M_FORBIDDEN``) out when refused.
"""

from __future__ import annotations

from typing import Any

from teia.errors import MatrixError

__all__ = [
    "State",
    "check_event",
    "default_power_levels",
    "membership_of",
    "power_levels",
    "user_level",
]

State = dict[tuple[str, str], dict[str, Any]]
"""Current state: (event type, state key) → event."""

_EVENT_LEVELS = {
    "m.room.name": 50,
    "m.room.topic": 50,
    "m.room.avatar": 50,
    "m.room.canonical_alias": 50,
    "m.room.power_levels": 100,
    "m.room.history_visibility": 100,
    "m.room.tombstone": 100,
    "m.room.server_acl": 100,
    "m.room.encryption": 100,
}


def default_power_levels(creator: str) -> dict[str, Any]:
    """The power levels a new room starts with: the creator at 100, moderation at 50."""
    return {
        "users": {creator: 100},
        "users_default": 0,
        "events": dict(_EVENT_LEVELS),
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0,
    }


def forbidden(message: str) -> MatrixError:
    return MatrixError(403, "M_FORBIDDEN", message)


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return default
    return default


def power_levels(state: State) -> dict[str, Any]:
    """The room's power levels content; without an event, the spec's defaults (creator 100)."""
    event = state.get(("m.room.power_levels", ""))
    if event is not None and isinstance(event.get("content"), dict):
        return dict(event["content"])
    create = state.get(("m.room.create", ""))
    creator = create["sender"] if create else ""
    return {"users": {creator: 100}, "state_default": 0, "events_default": 0}


def user_level(levels: dict[str, Any], user_id: str) -> int:
    users = levels.get("users") if isinstance(levels.get("users"), dict) else {}
    assert isinstance(users, dict)
    if user_id in users:
        return _int(users[user_id], 0)
    return _int(levels.get("users_default"), 0)


def _action_level(levels: dict[str, Any], action: str) -> int:
    return _int(levels.get(action), 0 if action == "invite" else 50)


def event_level(levels: dict[str, Any], event_type: str, *, is_state: bool) -> int:
    events = levels.get("events") if isinstance(levels.get("events"), dict) else {}
    assert isinstance(events, dict)
    if event_type in events:
        return _int(events[event_type], 0)
    if is_state:
        return _int(levels.get("state_default"), 50)
    return _int(levels.get("events_default"), 0)


def membership_of(state: State, user_id: str) -> str:
    event = state.get(("m.room.member", user_id))
    if event is None:
        return "leave"
    content = event.get("content")
    membership = content.get("membership") if isinstance(content, dict) else None
    return membership if isinstance(membership, str) else "leave"


def _join_rule(state: State) -> str:
    event = state.get(("m.room.join_rules", ""))
    content = event.get("content") if event else None
    rule = content.get("join_rule") if isinstance(content, dict) else None
    return rule if isinstance(rule, str) else "invite"


def check_event(event: dict[str, Any], state: State, *, redacted_sender: str | None = None) -> None:
    """Raise ``M_FORBIDDEN`` unless ``event`` is allowed on top of ``state``.

    For a redaction, ``redacted_sender`` is the sender of its target (anyone may redact their
    own events; others' need the ``redact`` level)."""
    event_type = event["type"]
    sender = event["sender"]
    create = state.get(("m.room.create", ""))
    if event_type == "m.room.create":
        if create is not None or event.get("prev_events"):
            raise forbidden("the room already exists")
        return
    if create is None:
        raise forbidden("unknown room")
    if event_type == "m.room.member":
        _check_membership(event, state, create)
        return
    if membership_of(state, sender) != "join":
        raise forbidden("you are not joined to this room")
    levels = power_levels(state)
    level = user_level(levels, sender)
    is_state = "state_key" in event
    if level < event_level(levels, event_type, is_state=is_state):
        raise forbidden(f"your power level is too low to send {event_type}")
    state_key = event.get("state_key")
    if isinstance(state_key, str) and state_key.startswith("@") and state_key != sender:
        raise forbidden("state keys that are user IDs belong to that user")
    if event_type == "m.room.power_levels":
        _check_power_levels(event, levels, level, sender)
    own = redacted_sender == sender
    if event_type == "m.room.redaction" and not own and level < _action_level(levels, "redact"):
        raise forbidden("your power level is too low to redact others' events")


def _check_membership(event: dict[str, Any], state: State, create: dict[str, Any]) -> None:
    sender = event["sender"]
    target = event.get("state_key")
    content = event.get("content") if isinstance(event.get("content"), dict) else {}
    assert isinstance(content, dict)
    membership = content.get("membership")
    if not isinstance(target, str) or not isinstance(membership, str):
        raise forbidden("a membership event needs a state_key and a membership")
    levels = power_levels(state)
    sender_membership = membership_of(state, sender)
    target_membership = membership_of(state, target)
    sender_level = user_level(levels, sender)
    target_level = user_level(levels, target)
    if membership == "join":
        if sender != target:
            raise forbidden("you can only join for yourself")
        if len(state) == 1 and create["sender"] == sender:
            return  # the creator's first join
        if target_membership == "ban":
            raise forbidden("you are banned from this room")
        if target_membership in ("join", "invite") or _join_rule(state) == "public":
            return
        raise forbidden("you are not invited to this room")
    if membership == "invite":
        if sender_membership != "join":
            raise forbidden("you are not joined to this room")
        if target_membership in ("join", "ban"):
            where = "in" if target_membership == "join" else "banned from"
            raise forbidden(f"the user is already {where} the room")
        if sender_level < _action_level(levels, "invite"):
            raise forbidden("your power level is too low to invite")
        return
    if membership == "leave":
        if sender == target:
            if target_membership not in ("join", "invite"):
                raise forbidden("you are not in this room")
            return
        if sender_membership != "join":
            raise forbidden("you are not joined to this room")
        if target_membership == "ban":
            if sender_level < _action_level(levels, "ban"):
                raise forbidden("your power level is too low to unban")
            return
        if target_membership not in ("join", "invite"):
            raise forbidden("the user is not in this room")
        if sender_level < _action_level(levels, "kick") or sender_level <= target_level:
            raise forbidden("your power level is too low to kick this user")
        return
    if membership == "ban":
        if sender_membership != "join":
            raise forbidden("you are not joined to this room")
        if sender_level < _action_level(levels, "ban") or sender_level <= target_level:
            raise forbidden("your power level is too low to ban this user")
        return
    raise forbidden(f"unsupported membership {membership!r}")


def _check_power_levels(
    event: dict[str, Any], old: dict[str, Any], level: int, sender: str
) -> None:
    new = event.get("content")
    if not isinstance(new, dict):
        raise MatrixError(400, "M_BAD_JSON", "power levels must be an object")
    for key in ("users", "events"):
        if key in new and not isinstance(new[key], dict):
            raise MatrixError(400, "M_BAD_JSON", f"power levels {key} must be an object")
    for key in ("ban", "kick", "redact", "invite", "events_default", "state_default",
                "users_default"):  # fmt: skip
        before = _int(old.get(key), 0)
        after = _int(new.get(key), 0)
        if before != after and (before > level or after > level):
            raise forbidden(f"you cannot change {key} beyond your own power level")
    old_users = old.get("users") if isinstance(old.get("users"), dict) else {}
    new_users = new.get("users", {})
    assert isinstance(old_users, dict)
    for user in set(old_users) | set(new_users):
        was = _int(old_users.get(user), 0) if user in old_users else None
        will = _int(new_users.get(user), 0) if user in new_users else None
        if was == will:
            continue
        if will is not None and will > level:
            raise forbidden("you cannot grant a power level above your own")
        if user != sender and was is not None and was >= level:
            raise forbidden("you cannot change the level of a user at or above your own")
