"""The homeserver's logic, below HTTP: accounts, rooms, events, sync, media.

`Homeserver` is what the client-server API (`teia.homeserver.api`) and federation call. It
builds and signs events, checks them against the room's power levels (`teia.homeserver.auth`),
persists them through the repository (`teia.homeserver.storage`) and wakes the long-polling
syncs of the users concerned (`Notifier`: anyio events, no polling).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Gauge

from teia.errors import MatrixError
from teia.homeserver import auth
from teia.homeserver.directory import Directory, parse_alias
from teia.homeserver.e2ee import (
    MAX_QUERY_USERS,
    E2eeStore,
    local_targets,
    remote_failures,
)
from teia.homeserver.events import (
    MAX_PDU_BYTES,
    ROOM_VERSION,
    canonical_json,
    client_event,
    compute_event_id,
    content_hash,
    pdu_for_wire,
    sign_event,
)
from teia.homeserver.keys import SigningKey
from teia.homeserver.passwords import hash_password, verify_password
from teia.homeserver.storage import HomeserverStore, StoredEvent, SyncRoom

__all__ = ["Homeserver", "HomeserverSettings", "Requester", "SyncToken"]

_LOCALPART = re.compile(r"^[a-z0-9._=\-/+]+$")
_USER_ID = re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-\[\]:]+$")
_MAX_TIMELINE = 100
_SESSION_CACHE = 10_000
_MAX_ACCOUNT_DATA = 1_000
"""Kinds of account data (global and per room together) one user may keep."""
OPENID_TOKEN_SECONDS = 3600


@dataclass(frozen=True)
class HomeserverSettings:
    """The policy of one homeserver (the service fills it from its configuration)."""

    server_name: str
    registration_open: bool = True
    max_request_bytes: int = 65_536
    max_upload_bytes: int = 10 * 1024 * 1024
    password_memory_kib: int = 65_536
    password_iterations: int = 3
    password_hashes_at_once: int = 2
    max_sync_timeout_ms: int = 60_000
    default_timeline_limit: int = 10


@dataclass(frozen=True)
class Requester:
    """An authenticated caller: the user, the device and the hash of the token used."""

    user_id: str
    device_id: str
    token_hash: str


@dataclass(frozen=True)
class SyncToken:
    """A position in the six streams: events, receipts, typing, the device's to-device
    messages, device-list changes and account data. ``s{e}_{r}_{t}_{d}_{k}_{a}`` (older tokens
    with fewer parts read as zeros for the rest)."""

    events: int
    receipts: int = 0
    typing: int = 0
    to_device: int = 0
    keys: int = 0
    account: int = 0

    def __str__(self) -> str:
        return (
            f"s{self.events}_{self.receipts}_{self.typing}_{self.to_device}_{self.keys}"
            f"_{self.account}"
        )

    @classmethod
    def parse(cls, text: str) -> SyncToken:
        parts = text[1:].split("_") if text[:1] in ("s", "t") else []
        if not 1 <= len(parts) <= 6 or not all(p.isdigit() and len(p) < 19 for p in parts):
            raise MatrixError(400, "M_INVALID_PARAM", "unknown pagination or sync token")
        numbers = [int(p) for p in parts] + [0] * 5
        return cls(*numbers[:6])


class Notifier:
    """Wakes the syncs waiting for a user. A sync takes `current(user)` *before* reading, so a
    change that lands while it reads still wakes it."""

    def __init__(self) -> None:
        self._events: dict[str, anyio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._waiting_changed = anyio.Event()

    async def wait(self, user_id: str, event: anyio.Event) -> None:
        """Wait for ``event`` (from `current`), counted as a waiting sync of ``user_id``."""
        self._waiting[user_id] = self._waiting.get(user_id, 0) + 1
        self._waiting_changed.set()
        self._waiting_changed = anyio.Event()
        try:
            await event.wait()
        finally:
            self._waiting[user_id] -= 1
            if not self._waiting[user_id]:
                del self._waiting[user_id]

    async def until_waiting(self, user_id: str) -> None:
        """Return once a sync of ``user_id`` is waiting (tests use it to order a send)."""
        while not self._waiting.get(user_id):
            await self._waiting_changed.wait()

    def current(self, user_id: str) -> anyio.Event:
        event = self._events.get(user_id)
        if event is None:
            event = self._events[user_id] = anyio.Event()
        return event

    def notify(self, user_ids: Iterable[str]) -> None:
        for user_id in user_ids:
            event = self._events.pop(user_id, None)
            if event is not None:
                event.set()


@dataclass
class _Typing:
    """Who types where: room → user → monotonic deadline; a serial per room for sync."""

    serial: int = field(default_factory=lambda: int(time.time() * 1000))
    rooms: dict[str, dict[str, float]] = field(default_factory=dict)
    room_serial: dict[str, int] = field(default_factory=dict)
    changed: anyio.Event | None = None
    """Set when a deadline was added (the expiry task waits for the nearest one)."""

    def set(self, room_id: str, user_id: str, deadline: float | None) -> None:
        users = self.rooms.setdefault(room_id, {})
        if deadline is None:
            if users.pop(user_id, None) is None:
                return
        else:
            users[user_id] = deadline
            if self.changed is not None:
                self.changed.set()
        self.serial += 1
        self.room_serial[room_id] = self.serial

    def next_deadline(self) -> float | None:
        deadlines = [d for users in self.rooms.values() for d in users.values()]
        return min(deadlines) if deadlines else None

    def expire(self, now: float) -> list[str]:
        """Drop the notices past their deadline; the rooms that changed (their serial moves,
        so a sync reports who stopped typing)."""
        touched = []
        for room_id, users in list(self.rooms.items()):
            gone = [u for u, deadline in users.items() if deadline <= now]
            for user_id in gone:
                del users[user_id]
            if gone:
                self.serial += 1
                self.room_serial[room_id] = self.serial
                touched.append(room_id)
            if not users:
                del self.rooms[room_id]
        return touched

    def users(self, room_id: str, now: float) -> list[str]:
        users = self.rooms.get(room_id, {})
        for user_id in [u for u, deadline in users.items() if deadline <= now]:
            del users[user_id]
        return sorted(users)


def _quiet_room(current: SyncToken) -> dict[str, Any]:
    """A joined room's sync entry with nothing new but what is added to it."""
    return {
        "timeline": {"events": [], "limited": False, "prev_batch": str(SyncToken(current.events))},
        "state": {"events": []},
        "ephemeral": {"events": []},
        "account_data": {"events": []},
        "unread_notifications": {},
    }


def _random_id(length: int, alphabet: str = string.ascii_letters) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bad_json(message: str) -> MatrixError:
    return MatrixError(400, "M_BAD_JSON", message)


def forbidden(message: str) -> MatrixError:
    return MatrixError(403, "M_FORBIDDEN", message)


def _not_found(message: str) -> MatrixError:
    return MatrixError(404, "M_NOT_FOUND", message)


def valid_user_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 255 and bool(_USER_ID.match(value))


def server_of(matrix_id: str) -> str:
    return matrix_id.split(":", 1)[1] if ":" in matrix_id else ""


class Homeserver:
    """One homeserver: its settings, signing key, repository and the syncs waiting on it."""

    def __init__(
        self,
        settings: HomeserverSettings,
        store: HomeserverStore,
        signing_key: SigningKey,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.server_name = settings.server_name
        self.store = store
        self.signing_key = signing_key
        self.notifier = Notifier()
        self.e2ee = E2eeStore(store.db)
        self._typing = _Typing()
        self._write_lock = anyio.Lock()
        # Each Argon2id hash holds password_memory_kib (64 MiB by default) while it runs: bounded,
        # a burst of logins waits its turn instead of taking 64 MiB per request at once.
        self._hashing = anyio.CapacityLimiter(settings.password_hashes_at_once)
        self._sessions: OrderedDict[str, Requester] = OrderedDict()
        """Access token hash → session, the most recently used last (tokens are deleted only
        through `logout`, which forgets them here too)."""
        self.event_listeners: list[Callable[[dict[str, Any]], Awaitable[None]]] = []
        """Called after a local event is persisted (federation sends it out)."""
        self.remote_join: Callable[[str, str, list[str]], Awaitable[None]] | None = None
        """Joins a room on another server (set by federation)."""
        self.remote_keys: Callable[[str, str, dict[str, Any]], Awaitable[Any]] | None = None
        """Asks another server for keys: (server, ``query`` or ``claim``, body) → its answer
        (set by federation)."""
        self.send_edu: Callable[[str, dict[str, Any]], None] | None = None
        """Queues an EDU for another server (set by federation)."""
        self.remote_alias: Callable[[str, str], Awaitable[Any]] | None = None
        """Asks another server for one of its room aliases (set by federation)."""
        self.directory = Directory(self)
        self._events_total = Counter(
            "teia_homeserver_events_total",
            "events persisted, by origin (local or federation)",
            ["origin"],
            registry=registry,
        )
        self._syncs_waiting = Gauge(
            "teia_homeserver_syncs_waiting", "long-polling syncs waiting", registry=registry
        )
        self._logins = Counter(
            "teia_homeserver_logins_total",
            "registrations and logins, by outcome",
            ["kind", "outcome"],
            registry=registry,
        )

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    # accounts ------------------------------------------------------------------------------

    async def _hash_password(self, password: str) -> str:
        settings = self.settings
        return await anyio.to_thread.run_sync(
            lambda: hash_password(
                password.encode("utf-8"),
                memory_kib=settings.password_memory_kib,
                iterations=settings.password_iterations,
                lanes=4,
            ),
            limiter=self._hashing,
        )

    async def _password_matches(self, password: str, encoded: str) -> bool:
        return await anyio.to_thread.run_sync(
            verify_password, password.encode("utf-8"), encoded, limiter=self._hashing
        )

    def user_id_for(self, localpart_or_id: str) -> str:
        if localpart_or_id.startswith("@"):
            if server_of(localpart_or_id) != self.server_name:
                raise forbidden("that user is not on this server")
            return localpart_or_id
        return f"@{localpart_or_id}:{self.server_name}"

    async def _new_session(
        self, user_id: str, device_id: str | None, display_name: str | None = None
    ) -> dict[str, Any]:
        device = device_id or _random_id(10, string.ascii_uppercase)
        token = "mhs_" + secrets.token_urlsafe(32)
        await self.store.add_token(token_hash(token), user_id, device, self.now_ms())
        await self.store.add_device(user_id, device, display_name, self.now_ms())
        return {
            "user_id": user_id,
            "access_token": token,
            "device_id": device,
            "home_server": self.server_name,
        }

    async def username_available(self, localpart: str) -> bool:
        self._check_localpart(localpart)
        exists, _ = await self.store.profile(self.user_id_for(localpart))
        if exists:
            raise MatrixError(400, "M_USER_IN_USE", "that user ID is taken")
        return True

    def _check_localpart(self, localpart: str) -> None:
        if not _LOCALPART.match(localpart) or len(localpart) + len(self.server_name) > 250:
            raise MatrixError(
                400,
                "M_INVALID_USERNAME",
                "user names may contain only a-z, 0-9 and . _ = - / +",
            )

    async def register(
        self,
        localpart: str | None,
        password: str,
        device_id: str | None,
        inhibit_login: bool,
        display_name: str | None = None,
    ) -> dict[str, Any]:
        if not self.settings.registration_open:
            raise forbidden("registration is closed on this server")
        if localpart is None:
            localpart = _random_id(12, string.ascii_lowercase + string.digits)
        localpart = localpart.lower()
        self._check_localpart(localpart)
        if not 1 <= len(password) <= 512:
            raise MatrixError(400, "M_WEAK_PASSWORD", "a password of 1 to 512 characters")
        user_id = self.user_id_for(localpart)
        encoded = await self._hash_password(password)
        if not await self.store.create_user(user_id, encoded, self.now_ms()):
            self._logins.labels("register", "taken").inc()
            raise MatrixError(400, "M_USER_IN_USE", "that user ID is taken")
        self._logins.labels("register", "ok").inc()
        if inhibit_login:
            return {"user_id": user_id}
        return await self._new_session(user_id, device_id, display_name)

    async def login(
        self, user: str, password: str, device_id: str | None, display_name: str | None = None
    ) -> dict[str, Any]:
        try:
            user_id = self.user_id_for(user.lower() if not user.startswith("@") else user)
        except MatrixError:
            raise forbidden("invalid user name or password") from None
        encoded = await self.store.password_hash(user_id)
        if encoded is None or not await self._password_matches(password, encoded):
            self._logins.labels("login", "refused").inc()
            raise forbidden("invalid user name or password")
        self._logins.labels("login", "ok").inc()
        return await self._new_session(user_id, device_id, display_name)

    async def authenticate(self, token: str) -> Requester:
        hashed = token_hash(token)
        cached = self._sessions.get(hashed)
        if cached is not None:
            self._sessions.move_to_end(hashed)
            return cached
        owner = await self.store.token_owner(hashed)
        if owner is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "unknown or expired access token",
                              soft_logout=False)  # fmt: skip
        requester = Requester(owner[0], owner[1], hashed)
        self._sessions[hashed] = requester
        while len(self._sessions) > _SESSION_CACHE:
            self._sessions.popitem(last=False)
        return requester

    async def logout(self, requester: Requester, *, everywhere: bool = False) -> None:
        # Forget the cached sessions first: a request racing the logout sees the database.
        if everywhere:
            for hashed in [h for h, r in self._sessions.items() if r.user_id == requester.user_id]:
                del self._sessions[hashed]
            devices = await self.store.user_devices(requester.user_id)
            await self.store.delete_user_tokens(requester.user_id)
        else:
            self._sessions.pop(requester.token_hash, None)
            await self.store.delete_token(requester.token_hash)
            devices = [requester.device_id]
        # A device that logs out is gone: its keys and waiting messages too.
        for device in devices:
            await self.e2ee.forget_device(requester.user_id, device)
            await self._devices_changed(requester.user_id, device, deleted=True)

    # devices -------------------------------------------------------------------------------

    async def devices(self, requester: Requester) -> list[dict[str, Any]]:
        out = []
        for device_id, name in await self.store.devices(requester.user_id):
            # Where and when a device was last seen is not recorded (null, as Synapse says
            # for a device it has not seen).
            out.append(
                {
                    "device_id": device_id,
                    "display_name": name,
                    "last_seen_ip": None,
                    "last_seen_ts": None,
                }
            )
        return out

    async def device(self, requester: Requester, device_id: str) -> dict[str, Any]:
        for entry in await self.devices(requester):
            if entry["device_id"] == device_id:
                return entry
        raise _not_found("no such device")

    async def rename_device(self, requester: Requester, device_id: str, name: Any) -> None:
        if name is not None and (not isinstance(name, str) or len(name) > 255):
            raise bad_json("display_name is a string of at most 255 characters")
        await self.device(requester, device_id)  # 404 for a device that is not the user's
        await self.store.rename_device(requester.user_id, device_id, name)

    async def check_password_auth(self, requester: Requester, auth_dict: Any) -> None:
        """User-interactive authentication by password (deleting devices asks for it): 401
        with the flow when absent, 401 ``M_FORBIDDEN`` when wrong or for another user."""
        flows = {"flows": [{"stages": ["m.login.password"]}], "params": {}}
        session = auth_dict.get("session") if isinstance(auth_dict, dict) else None
        session = session if isinstance(session, str) else _random_id(16)
        if not isinstance(auth_dict, dict) or auth_dict.get("type") != "m.login.password":
            raise MatrixError(401, "M_FORBIDDEN", "confirm with your password", session=session,
                              **flows)  # fmt: skip
        identifier = auth_dict.get("identifier")
        user = identifier.get("user") if isinstance(identifier, dict) else auth_dict.get("user")
        password = auth_dict.get("password")
        try:
            user_id = self.user_id_for(user) if isinstance(user, str) else None
        except MatrixError:
            user_id = None
        encoded = await self.store.password_hash(requester.user_id)
        if (
            user_id != requester.user_id
            or not isinstance(password, str)
            or encoded is None
            or not await self._password_matches(password, encoded)
        ):
            raise MatrixError(401, "M_FORBIDDEN", "invalid password", session=session, **flows)

    async def delete_devices(
        self, requester: Requester, device_ids: list[str], auth_dict: Any
    ) -> None:
        await self.check_password_auth(requester, auth_dict)
        for device_id in device_ids:
            for hashed in await self.store.delete_device(requester.user_id, device_id):
                self._sessions.pop(hashed, None)
            await self.e2ee.forget_device(requester.user_id, device_id)
            await self._devices_changed(requester.user_id, device_id, deleted=True)

    # account data --------------------------------------------------------------------------

    async def put_account_data(
        self, requester: Requester, user_id: str, room_id: str, data_type: str, content: Any
    ) -> None:
        if user_id != requester.user_id:
            raise forbidden("you can only set your own account data")
        if not 0 < len(data_type) <= 255:
            raise MatrixError(400, "M_INVALID_PARAM", "a type of at most 255 characters")
        if data_type in ("m.fully_read", "m.push_rules"):
            raise MatrixError(400, "M_BAD_JSON", f"{data_type} is set through its own API")
        if room_id and not await self.store.room_exists(room_id):
            raise _not_found("no such room")
        await self._store_account_data(user_id, room_id, data_type, content)

    async def _store_account_data(
        self, user_id: str, room_id: str, data_type: str, content: Any
    ) -> None:
        await self.store.put_account_data(
            user_id, room_id, data_type, json.dumps(content), _MAX_ACCOUNT_DATA
        )
        self.notifier.notify([user_id])

    async def get_account_data(
        self, requester: Requester, user_id: str, room_id: str, data_type: str
    ) -> Any:
        if user_id != requester.user_id:
            raise forbidden("you can only read your own account data")
        found = await self.store.get_account_data(user_id, room_id, data_type)
        if found is None:
            raise _not_found("no account data of that type")
        return json.loads(found)

    # end-to-end encryption keys and to-device messages (teia.homeserver.e2ee) -------------

    def is_local(self, user_id: str) -> bool:
        return server_of(user_id) == self.server_name

    async def keys_upload(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        counts, changed = await self.e2ee.upload(requester.user_id, requester.device_id, body)
        if changed:
            await self._devices_changed(requester.user_id, requester.device_id, deleted=False)
        return {"one_time_key_counts": counts}

    async def _devices_changed(self, user_id: str, device_id: str, *, deleted: bool) -> None:
        """Wake the syncs of everyone sharing a room with ``user_id`` and tell their servers
        (``m.device_list_update``: they mark the user changed, their clients query again)."""
        sharing = await self.e2ee.sharing_users(user_id)
        self.notifier.notify(sharing)
        if self.send_edu is None:
            return
        edu = {
            "edu_type": "m.device_list_update",
            "content": {
                "user_id": user_id,
                "device_id": device_id,
                "stream_id": await self.e2ee.max_change(),
                "prev_id": [],
                "deleted": deleted,
            },
        }
        for server in sorted({server_of(u) for u in sharing} - {self.server_name, ""}):
            self.send_edu(server, edu)

    def _users_asked(self, wanted: Any, what: str) -> dict[str, Any]:
        if not isinstance(wanted, dict):
            raise bad_json(f"{what} must be an object")
        if len(wanted) > MAX_QUERY_USERS:
            raise MatrixError(400, "M_LIMIT_EXCEEDED", f"at most {MAX_QUERY_USERS} users a request")
        for user_id in wanted:
            if not valid_user_id(user_id):
                raise MatrixError(400, "M_INVALID_PARAM", "not a user ID")
        return wanted

    async def keys_query(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        wanted = self._users_asked(body.get("device_keys"), "device_keys")
        local: dict[str, list[str]] = {}
        for user_id, devices in wanted.items():
            if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
                raise bad_json("device_keys maps users to lists of device IDs")
            if self.is_local(user_id):
                local[user_id] = devices
        found = await self.e2ee.query(local)
        remote, failures = await self._ask_servers(wanted, "query", "device_keys")
        for user_id, devices in remote.items():
            if isinstance(devices, dict):
                found[user_id] = {
                    d: k
                    for d, k in devices.items()
                    if isinstance(k, dict)
                    and k.get("user_id") == user_id
                    and k.get("device_id") == d
                }
        return {"device_keys": found, "failures": failures}

    async def _ask_servers(
        self, wanted: dict[str, Any], kind: str, field_name: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Ask each other server about its users in ``wanted`` (10 s each, in parallel):
        (user → its answer, for users of the server answering only; failures by server)."""
        by_server: dict[str, dict[str, Any]] = {}
        for user_id, value in wanted.items():
            if not self.is_local(user_id):
                by_server.setdefault(server_of(user_id), {})[user_id] = value
        answers: dict[str, Any] = {}
        failures: dict[str, Any] = {}
        if not by_server:
            return answers, failures
        if self.remote_keys is None:
            return answers, remote_failures(wanted, self.is_local, server_of)
        ask = self.remote_keys

        async def one(server: str, users: dict[str, Any]) -> None:
            try:
                with anyio.fail_after(10):
                    answer = await ask(server, kind, {field_name: users})
                got = answer.get(field_name) if isinstance(answer, dict) else None
                if not isinstance(got, dict):
                    raise ValueError("no answer")
                for user_id in users:
                    if user_id in got:
                        answers[user_id] = got[user_id]
            except Exception as exc:  # one server's failure must not fail the rest
                failures[server] = {"status": 503, "message": type(exc).__name__}

        async with anyio.create_task_group() as tg:
            for server, users in by_server.items():
                tg.start_soon(one, server, users)
        return answers, failures

    async def keys_claim(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        wanted = self._users_asked(body.get("one_time_keys"), "one_time_keys")
        local: dict[str, dict[str, str]] = {}
        for user_id, devices in wanted.items():
            if not isinstance(devices, dict) or not all(
                isinstance(d, str) and isinstance(a, str) for d, a in devices.items()
            ):
                raise bad_json("one_time_keys maps users to devices to algorithms")
            if self.is_local(user_id):
                local[user_id] = devices
        claimed = await self.e2ee.claim(local)
        remote, failures = await self._ask_servers(wanted, "claim", "one_time_keys")
        for user_id, devices in remote.items():
            if isinstance(devices, dict):
                claimed[user_id] = {d: k for d, k in devices.items() if isinstance(k, dict)}
        return {"one_time_keys": claimed, "failures": failures}

    async def keys_changes(self, requester: Requester, start: str, end: str) -> dict[str, Any]:
        after, upto = SyncToken.parse(start), SyncToken.parse(end)
        changed = await self.e2ee.changed_users(requester.user_id, after.keys, upto.keys)
        return {"changed": changed, "left": []}

    async def send_to_device(
        self, requester: Requester, event_type: str, txn_id: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        messages = body.get("messages")
        local = local_targets(messages, self.is_local)
        fresh, reached = await self.e2ee.send_to_device(
            requester.user_id,
            requester.device_id,
            txn_id,
            event_type,
            local,
            self.now_ms(),
        )
        self.notifier.notify(reached)
        if fresh and self.send_edu is not None:
            assert isinstance(messages, dict)  # checked by local_targets
            by_server: dict[str, dict[str, Any]] = {}
            for user_id, devices in messages.items():
                if not self.is_local(user_id) and valid_user_id(user_id):
                    by_server.setdefault(server_of(user_id), {})[user_id] = devices
            for server, users in sorted(by_server.items()):
                self.send_edu(
                    server,
                    {
                        "edu_type": "m.direct_to_device",
                        "content": {
                            "sender": requester.user_id,
                            "type": event_type,
                            "message_id": f"{requester.device_id}:{txn_id}"[:255],
                            "messages": users,
                        },
                    },
                )
        return {}

    async def direct_to_device(self, origin: str, content: Any) -> None:
        """An ``m.direct_to_device`` EDU from ``origin``: messages from one of its users to
        ours (others dropped), once per message ID."""
        if not isinstance(content, dict):
            raise bad_json("an EDU's content is an object")
        sender, event_type = content.get("sender"), content.get("type")
        message_id = content.get("message_id")
        if not valid_user_id(sender) or server_of(str(sender)) != origin:
            raise forbidden("the sender is not a user of the sending server")
        if not isinstance(event_type, str) or not isinstance(message_id, str):
            raise bad_json("a to-device EDU has a type and a message ID")
        local = local_targets(content.get("messages"), self.is_local)
        _, reached = await self.e2ee.send_to_device(
            str(sender), f"federation {origin}", message_id[:255], event_type[:255], local,
            self.now_ms(),
        )  # fmt: skip
        self.notifier.notify(reached)

    async def device_list_update(self, origin: str, content: Any) -> None:
        """An ``m.device_list_update`` EDU: a user of ``origin`` changed devices; our users
        sharing a room with it see it in ``device_lists.changed``."""
        user_id = content.get("user_id") if isinstance(content, dict) else None
        if not valid_user_id(user_id) or server_of(str(user_id)) != origin:
            raise forbidden("the user is not a user of the sending server")
        await self.e2ee.note_change(str(user_id))
        self.notifier.notify(await self.e2ee.sharing_users(str(user_id)))

    async def openid_token(self, requester: Requester, user_id: str) -> dict[str, Any]:
        """An OpenID token proving to a third party (an identity service) who the caller is;
        valid for an hour, exchanged through ``/_matrix/federation/v1/openid/userinfo``."""
        if user_id != requester.user_id:
            raise forbidden("you can only request OpenID tokens for yourself")
        token = "oid_" + secrets.token_urlsafe(32)
        now = self.now_ms()
        await self.store.add_openid_token(
            token_hash(token), user_id, now, now + OPENID_TOKEN_SECONDS * 1000
        )
        return {
            "access_token": token,
            "token_type": "Bearer",
            "matrix_server_name": self.server_name,
            "expires_in": OPENID_TOKEN_SECONDS,
        }

    async def openid_userinfo(self, token: str) -> str:
        """The user an OpenID token of this server belongs to (``M_UNKNOWN_TOKEN`` if none)."""
        user_id = await self.store.openid_token_owner(token_hash(token), self.now_ms())
        if user_id is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "unknown or expired OpenID token")
        return user_id

    # profiles ------------------------------------------------------------------------------

    async def profile(self, user_id: str) -> dict[str, Any]:
        exists, name = await self.store.profile(user_id)
        if not exists:
            raise _not_found("no such user")
        return {} if name is None else {"displayname": name}

    async def set_displayname(self, requester: Requester, user_id: str, name: Any) -> None:
        if user_id != requester.user_id:
            raise forbidden("you can only change your own display name")
        if name is not None and (not isinstance(name, str) or len(name) > 256):
            raise bad_json("displayname must be a string of at most 256 characters")
        await self.store.set_displayname(user_id, name)
        # Clients show the name a room's member event carries: each joined room gets a new
        # one (as Synapse does; at most 1,000 rooms, the rest keep the old name).
        for room_id in (await self.joined_rooms(requester))[:1000]:
            async with self._write_lock:
                state = await self.store.current_state(room_id)
                held = state.get(("m.room.member", user_id))
                content = dict(held.get("content", {})) if held else {}
                if content.get("membership") != "join" or content.get("displayname") == name:
                    continue
                content.pop("reason", None)
                if name:
                    content["displayname"] = name
                else:
                    content.pop("displayname", None)
                with contextlib.suppress(MatrixError):  # a room that forbids it keeps the old
                    await self._send_locked(
                        user_id, room_id, "m.room.member", content, state_key=user_id
                    )

    async def search_users(self, term: str, limit: int) -> dict[str, Any]:
        limit = max(1, min(limit, 50))
        found = await self.store.search_users(term, limit + 1)
        results = [
            {"user_id": user_id, "display_name": name} if name else {"user_id": user_id}
            for user_id, name in found[:limit]
        ]
        return {"results": results, "limited": len(found) > limit}

    # events --------------------------------------------------------------------------------

    async def _build(
        self,
        room_id: str,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        state: auth.State,
        *,
        state_key: str | None = None,
        redacts: str | None = None,
        extremities: list[tuple[str, int]] | None = None,
    ) -> dict[str, Any]:
        if extremities is None:
            extremities = await self.store.extremities(room_id)
        depth = max((d for _, d in extremities), default=0) + 1
        wanted = [("m.room.create", ""), ("m.room.power_levels", ""), ("m.room.member", sender)]
        if event_type == "m.room.member" and state_key is not None:
            wanted += [("m.room.member", state_key), ("m.room.join_rules", "")]
        auth_events = sorted({state[k]["event_id"] for k in wanted if k in state})
        event: dict[str, Any] = {
            "room_id": room_id,
            "sender": sender,
            "type": event_type,
            "content": content,
            "origin_server_ts": self.now_ms(),
            "depth": depth,
            "prev_events": [e for e, _ in extremities],
            "auth_events": auth_events,
        }
        if state_key is not None:
            event["state_key"] = state_key
        if redacts is not None:
            event["redacts"] = redacts
        event["hashes"] = {"sha256": content_hash(event)}
        sign_event(event, self.server_name, self.signing_key.key_id, self.signing_key)
        if len(canonical_json(event)) > MAX_PDU_BYTES:
            raise MatrixError(413, "M_TOO_LARGE", "event too large (64 KiB at most)")
        event["event_id"] = compute_event_id(event)
        return event

    async def _persist(
        self, event: dict[str, Any], *, txn: tuple[str, str] | None = None, local: bool = True
    ) -> int:
        stream, new, members = await self.store.persist_event(event, txn=txn)
        if new:
            self._events_total.labels("local" if local else "federation").inc()
            extra = [event["state_key"]] if event["type"] == "m.room.member" else []
            self.notifier.notify([*members, *extra])
            if local:
                for listener in self.event_listeners:
                    await listener(event)
        return stream

    async def _room_state(self, room_id: str) -> auth.State:
        state = await self.store.current_state(room_id)
        if not state:
            raise _not_found("unknown room")
        return state

    async def _send_locked(
        self,
        requester_user: str,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        state_key: str | None = None,
        redacts: str | None = None,
        txn: tuple[str, str] | None = None,
        redacted_sender: str | None = None,
        head: tuple[auth.State, list[tuple[str, int]]] | None = None,
    ) -> dict[str, Any]:
        if head is None:
            state, extremities = await self._room_state(room_id), None
        else:
            state, extremities = head
            if not state:
                raise _not_found("unknown room")
        event = await self._build(
            room_id, requester_user, event_type, content, state,
            state_key=state_key, redacts=redacts, extremities=extremities,
        )  # fmt: skip
        auth.check_event(event, state, redacted_sender=redacted_sender)
        await self._persist(event, txn=txn)
        return event

    async def send(
        self,
        requester: Requester,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        state_key: str | None = None,
        txn_id: str | None = None,
    ) -> str:
        """Send a message or state event; idempotent per (device, transaction ID)."""
        if event_type == "m.room.create" or (event_type == "m.room.member" and state_key):
            raise forbidden(f"use the membership endpoints to send {event_type}")
        if event_type == "m.room.redaction":
            raise forbidden("use the redact endpoint")
        txn = (requester.device_id, txn_id) if txn_id is not None else None
        async with self._write_lock:
            done, state, extremities = await self.store.send_context(
                room_id, None if txn is None else (requester.user_id, *txn)
            )
            if done is not None:
                return done
            await self._check_relation(requester.user_id, room_id, content)
            event = await self._send_locked(
                requester.user_id, room_id, event_type, content, state_key=state_key, txn=txn,
                head=(state, extremities),
            )  # fmt: skip
        return str(event["event_id"])

    async def _check_relation(self, sender: str, room_id: str, content: dict[str, Any]) -> None:
        relates = content.get("m.relates_to")
        if relates is None:
            return
        if not isinstance(relates, dict) or not isinstance(relates.get("event_id"), str):
            raise bad_json("m.relates_to must name an event_id")
        target = await self.store.get_event(relates["event_id"])
        if target is None or target.event["room_id"] != room_id:
            raise _not_found("the related event is not in this room")
        if relates.get("rel_type") == "m.annotation":
            key = relates.get("key")
            if not isinstance(key, str) or not key:
                raise bad_json("an annotation needs a key")
            if await self.store.annotation_exists(relates["event_id"], sender, key):
                raise MatrixError(400, "M_DUPLICATE_ANNOTATION", "you already reacted so")

    async def redact(
        self, requester: Requester, room_id: str, event_id: str, txn_id: str, reason: Any
    ) -> str:
        content: dict[str, Any] = {}
        if isinstance(reason, str):
            content["reason"] = reason[:1024]
        async with self._write_lock:
            done = await self.store.event_by_txn(requester.user_id, requester.device_id, txn_id)
            if done is not None:
                return done
            target = await self.store.get_event(event_id)
            if target is None or target.event["room_id"] != room_id:
                raise _not_found("no such event in this room")
            event = await self._send_locked(
                requester.user_id, room_id, "m.room.redaction", content, redacts=event_id,
                txn=(requester.device_id, txn_id), redacted_sender=target.event["sender"],
            )  # fmt: skip
        return str(event["event_id"])

    # rooms ---------------------------------------------------------------------------------

    async def create_room(self, requester: Requester, body: dict[str, Any]) -> str:
        user = requester.user_id
        preset = body.get("preset")
        if preset is None:
            preset = "public_chat" if body.get("visibility") == "public" else "private_chat"
        if preset not in ("private_chat", "public_chat", "trusted_private_chat"):
            raise bad_json("preset must be private_chat, public_chat or trusted_private_chat")
        invites = body.get("invite", [])
        if not isinstance(invites, list) or not all(valid_user_id(u) for u in invites):
            raise bad_json("invite must be a list of user IDs")
        for key in ("name", "topic"):
            if key in body and not isinstance(body[key], str):
                raise bad_json(f"{key} must be a string")
        initial_state = body.get("initial_state", [])
        if not isinstance(initial_state, list) or not all(
            isinstance(e, dict) and isinstance(e.get("type"), str)
            and isinstance(e.get("content"), dict)
            and isinstance(e.get("state_key", ""), str)
            for e in initial_state
        ):  # fmt: skip
            raise bad_json("initial_state must be a list of {type, state_key, content}")
        override = body.get("power_level_content_override", {})
        if not isinstance(override, dict):
            raise bad_json("power_level_content_override must be an object")
        creation = body.get("creation_content", {})
        if not isinstance(creation, dict):
            raise bad_json("creation_content must be an object")
        alias = None
        alias_name = body.get("room_alias_name")
        if alias_name is not None:
            if not isinstance(alias_name, str):
                raise bad_json("room_alias_name must be a string")
            alias = f"#{alias_name}:{self.server_name}"
            parse_alias(alias)
            try:
                await self.directory.resolve(alias)
            except MatrixError as exc:
                if exc.status != 404:
                    raise
            else:
                raise MatrixError(400, "M_ROOM_IN_USE", "that room alias is taken")
        for invitee in invites:
            if server_of(invitee) == self.server_name:
                exists, _ = await self.store.profile(invitee)
                if not exists:
                    raise _not_found(f"no such user {invitee}")
        room_id = f"!{_random_id(18)}:{self.server_name}"
        levels = auth.default_power_levels(user)
        if preset == "trusted_private_chat":
            for invitee in invites:
                levels["users"][invitee] = 100
        levels.update(override)
        join_rule = "public" if preset == "public_chat" else "invite"
        steps: list[tuple[str, str, dict[str, Any]]] = [
            ("m.room.create", "", {**creation, "creator": user, "room_version": ROOM_VERSION}),
            ("m.room.member", user, {"membership": "join"}),
            ("m.room.power_levels", "", levels),
            ("m.room.join_rules", "", {"join_rule": join_rule}),
            ("m.room.history_visibility", "", {"history_visibility": "shared"}),
        ]
        if preset != "public_chat":
            steps.append(("m.room.guest_access", "", {"guest_access": "can_join"}))
        steps += [(e["type"], e.get("state_key", ""), e["content"]) for e in initial_state]
        if alias is not None:
            steps.append(("m.room.canonical_alias", "", {"alias": alias}))
        if "name" in body:
            steps.append(("m.room.name", "", {"name": body["name"]}))
        if "topic" in body:
            steps.append(("m.room.topic", "", {"topic": body["topic"]}))
        direct = body.get("is_direct") is True
        steps += [
            (
                "m.room.member",
                u,
                {"membership": "invite", **({"is_direct": True} if direct else {})},
            )
            for u in invites
        ]
        async with self._write_lock:
            await self.store.create_room(room_id, ROOM_VERSION, self.now_ms())
            state: auth.State = {}
            for event_type, state_key, content in steps:
                event = await self._build(room_id, user, event_type, content, state,
                                          state_key=state_key)  # fmt: skip
                auth.check_event(event, state)
                await self._persist(event)
                state[(event_type, state_key)] = event
        if alias is not None:
            await self.directory.create_alias(requester, alias, room_id)
        if body.get("visibility") == "public":
            await self.directory.list_room(room_id, True)
        return room_id

    async def membership(
        self,
        requester: Requester,
        room_id: str,
        target: str,
        membership: str,
        reason: Any = None,
    ) -> None:
        """Join, leave, invite, kick, ban or unban (``membership`` is the new state)."""
        if not valid_user_id(target):
            raise bad_json("user_id must be a user ID")
        content: dict[str, Any] = {"membership": membership}
        if isinstance(reason, str):
            content["reason"] = reason[:1024]
        if membership == "join":
            exists, name = await self.store.profile(requester.user_id)
            if name:
                content["displayname"] = name
        if membership == "invite" and server_of(target) == self.server_name:
            exists, _ = await self.store.profile(target)
            if not exists:
                raise _not_found("no such user")
        async with self._write_lock:
            await self._send_locked(
                requester.user_id, room_id, "m.room.member", content, state_key=target
            )

    async def join(self, requester: Requester, room_id: str, servers: list[str]) -> str:
        """Join a room (by ID, or by alias: resolved first) this server knows, or one on
        another server through federation; the room ID."""
        if room_id.startswith("#"):
            room_id, via = await self.directory.resolve(room_id)
            servers = [*servers, *via]
        await self._join_id(requester, room_id, servers)
        return room_id

    async def _join_id(self, requester: Requester, room_id: str, servers: list[str]) -> None:
        if await self.store.current_state(room_id):
            await self.membership(requester, room_id, requester.user_id, "join")
            return
        if self.remote_join is None:
            raise _not_found("unknown room")
        candidates = [s for s in [*servers, server_of(room_id)] if s != self.server_name]
        if not candidates:
            raise _not_found("unknown room")
        await self.remote_join(requester.user_id, room_id, list(dict.fromkeys(candidates)))

    async def joined_rooms(self, requester: Requester) -> list[str]:
        rooms = await self.store.rooms_for_user(requester.user_id)
        return [room for room, membership, _ in rooms if membership == "join"]

    async def _visible_upto(self, requester: Requester, room_id: str) -> int | None:
        """The last stream position the user may read in the room (None: no limit)."""
        membership = await self.store.membership(room_id, requester.user_id)
        if membership is None or membership[0] in ("invite",):
            raise forbidden("you are not in this room")
        if membership[0] == "join":
            return None
        return membership[1]

    async def room_state(self, requester: Requester, room_id: str) -> list[dict[str, Any]]:
        membership = await self.store.membership(room_id, requester.user_id)
        if membership is None or membership[0] != "join":
            raise forbidden("you are not joined to this room")
        state = await self.store.current_state(room_id)
        now = self.now_ms()
        return [client_event(e, now_ms=now) for e in state.values()]

    async def state_event(
        self, requester: Requester, room_id: str, event_type: str, state_key: str
    ) -> dict[str, Any]:
        membership = await self.store.membership(room_id, requester.user_id)
        if membership is None or membership[0] != "join":
            raise forbidden("you are not joined to this room")
        state = await self.store.current_state(room_id)
        event = state.get((event_type, state_key))
        if event is None:
            raise _not_found("no such state")
        content = event.get("content")
        return content if isinstance(content, dict) else {}

    async def room_event(self, requester: Requester, room_id: str, event_id: str) -> dict[str, Any]:
        upto = await self._visible_upto(requester, room_id)
        stored = await self.store.get_event(event_id)
        if stored is None or stored.event["room_id"] != room_id:
            raise _not_found("no such event")
        if upto is not None and stored.stream > upto:
            raise _not_found("no such event")
        return self._client(requester, stored, self.now_ms())

    async def joined_members(self, requester: Requester, room_id: str) -> dict[str, Any]:
        await self._visible_upto(requester, room_id)
        state = await self.store.current_state(room_id)
        joined = {}
        for (event_type, key), event in state.items():
            content = event.get("content", {})
            if event_type == "m.room.member" and content.get("membership") == "join":
                entry = {}
                if isinstance(content.get("displayname"), str):
                    entry["display_name"] = content["displayname"]
                joined[key] = entry
        return {"joined": joined}

    async def members(self, requester: Requester, room_id: str) -> dict[str, Any]:
        await self._visible_upto(requester, room_id)
        state = await self.store.current_state(room_id)
        now = self.now_ms()
        chunk = [client_event(e, now_ms=now) for (t, _), e in state.items() if t == "m.room.member"]
        return {"chunk": chunk}

    def _client(self, requester: Requester, stored: StoredEvent, now: int) -> dict[str, Any]:
        unsigned = dict(stored.event.get("unsigned", {}))
        if (
            stored.txn_id is not None
            and stored.event["sender"] == requester.user_id
            and (stored.txn_device == requester.device_id)
        ):
            unsigned["transaction_id"] = stored.txn_id
        return client_event(stored.event, now_ms=now, unsigned=unsigned)

    async def messages(
        self,
        requester: Requester,
        room_id: str,
        from_token: str | None,
        direction: str,
        limit: int,
    ) -> dict[str, Any]:
        if direction not in ("b", "f"):
            raise MatrixError(400, "M_INVALID_PARAM", "dir must be b or f")
        limit = max(1, min(limit, _MAX_TIMELINE))
        upto = await self._visible_upto(requester, room_id)
        current = await self.store.max_stream()
        ceiling = current if upto is None else min(upto, current)
        if from_token is None:
            position = ceiling if direction == "b" else 0
        else:
            position = SyncToken.parse(from_token).events
        if direction == "b":
            events = await self.store.room_events(
                room_id, after=0, upto=min(position, ceiling), limit=limit, newest_first=True
            )
        else:
            events = await self.store.room_events(
                room_id, after=position, upto=ceiling, limit=limit, newest_first=False
            )
        now = self.now_ms()
        out: dict[str, Any] = {
            "chunk": [self._client(requester, e, now) for e in events],
            "start": str(SyncToken(position)),
        }
        if len(events) == limit:
            last = events[-1].stream
            out["end"] = str(SyncToken(last - 1 if direction == "b" else last))
        return out

    # typing and receipts -------------------------------------------------------------------

    async def set_typing(
        self, requester: Requester, room_id: str, user_id: str, typing: bool, timeout_ms: int
    ) -> None:
        if user_id != requester.user_id:
            raise forbidden("you can only set your own typing state")
        membership = await self.store.membership(room_id, user_id)
        if membership is None or membership[0] != "join":
            raise forbidden("you are not joined to this room")
        timeout = max(0, min(timeout_ms, 120_000)) / 1000
        self._typing.set(room_id, user_id, anyio.current_time() + timeout if typing else None)
        members = await self.store.room_members(room_id)
        self.notifier.notify(members)
        self._edu_to_room(
            members,
            {
                "edu_type": "m.typing",
                "content": {"room_id": room_id, "user_id": user_id, "typing": typing},
            },
        )

    async def run_typing_expiry(self) -> None:
        """For the server's life: when a typing notice lapses, the room's waiting syncs wake
        and report it (instead of at their next wake-up for another reason)."""
        while True:
            changed = self._typing.changed = anyio.Event()
            deadline = self._typing.next_deadline()
            wait = math.inf if deadline is None else max(0.0, deadline - anyio.current_time())
            with anyio.move_on_after(wait):
                await changed.wait()
            for room_id in self._typing.expire(anyio.current_time()):
                self.notifier.notify(await self.store.room_members(room_id))

    def _edu_to_room(self, members: list[str], edu: dict[str, Any]) -> None:
        """Send an EDU to every other server with a joined member in the room."""
        if self.send_edu is None:
            return
        for server in sorted({server_of(m) for m in members} - {self.server_name, ""}):
            self.send_edu(server, edu)

    async def remote_typing(self, origin: str, content: Any) -> None:
        """An ``m.typing`` EDU: a user of ``origin``, joined to the room, types or stops
        (for at most 30 s: servers repeat the notice while the typing lasts)."""
        if not isinstance(content, dict):
            raise bad_json("an EDU's content is an object")
        room_id, user_id, typing = (
            content.get("room_id"), content.get("user_id"), content.get("typing"),
        )  # fmt: skip
        if not valid_user_id(user_id) or server_of(str(user_id)) != origin:
            raise forbidden("the user is not a user of the sending server")
        if not isinstance(room_id, str) or not isinstance(typing, bool):
            raise bad_json("m.typing has a room ID and a typing flag")
        membership = await self.store.membership(room_id, str(user_id))
        if membership is None or membership[0] != "join":
            raise forbidden("the user is not joined to that room")
        self._typing.set(room_id, str(user_id), anyio.current_time() + 30 if typing else None)
        self.notifier.notify(await self.store.room_members(room_id))

    async def remote_receipts(self, origin: str, content: Any) -> None:
        """An ``m.receipt`` EDU: read receipts of ``origin``'s users (joined to the room, for
        events of the room); ``m.read`` only (private receipts never leave their server)."""
        if not isinstance(content, dict):
            raise bad_json("an EDU's content is an object")
        for room_id, kinds in list(content.items())[:100]:
            users = kinds.get("m.read") if isinstance(kinds, dict) else None
            if not isinstance(room_id, str) or not isinstance(users, dict):
                continue
            for user_id, receipt in list(users.items())[:100]:
                event_ids = receipt.get("event_ids") if isinstance(receipt, dict) else None
                if (
                    not valid_user_id(user_id)
                    or server_of(user_id) != origin
                    or not isinstance(event_ids, list)
                    or not event_ids
                    or not isinstance(event_ids[-1], str)
                ):
                    continue
                membership = await self.store.membership(room_id, user_id)
                target = await self.store.get_event(event_ids[-1])
                if membership is None or membership[0] != "join":
                    continue
                if target is None or target.event["room_id"] != room_id:
                    continue
                await self.store.put_receipt(room_id, user_id, "m.read", event_ids[-1],
                                             self.now_ms())  # fmt: skip
                self.notifier.notify(await self.store.room_members(room_id))

    async def receipt(
        self, requester: Requester, room_id: str, receipt_type: str, event_id: str
    ) -> None:
        if receipt_type not in ("m.read", "m.read.private", "m.fully_read"):
            raise MatrixError(400, "M_INVALID_PARAM", "unsupported receipt type")
        membership = await self.store.membership(room_id, requester.user_id)
        if membership is None or membership[0] != "join":
            raise forbidden("you are not joined to this room")
        target = await self.store.get_event(event_id)
        if target is None or target.event["room_id"] != room_id:
            raise _not_found("no such event in this room")
        if receipt_type == "m.fully_read":
            # The read marker is the user's room account data.
            await self._store_account_data(
                requester.user_id, room_id, "m.fully_read", {"event_id": event_id}
            )
            return
        now = self.now_ms()
        await self.store.put_receipt(room_id, requester.user_id, receipt_type, event_id, now)
        if receipt_type == "m.read.private":
            self.notifier.notify([requester.user_id])
            return
        members = await self.store.room_members(room_id)
        self.notifier.notify(members)
        self._edu_to_room(
            members,
            {
                "edu_type": "m.receipt",
                "content": {
                    room_id: {
                        "m.read": {
                            requester.user_id: {"event_ids": [event_id], "data": {"ts": now}}
                        }
                    }
                },
            },
        )

    # sync ----------------------------------------------------------------------------------

    async def sync(
        self,
        requester: Requester,
        since: str | None,
        timeout_ms: int,
        timeline_limit: int | None,
        full_state: bool,
    ) -> dict[str, Any]:
        since_token = SyncToken.parse(since) if since else None
        limit = max(1, min(timeline_limit or self.settings.default_timeline_limit, _MAX_TIMELINE))
        timeout = max(0, min(timeout_ms, self.settings.max_sync_timeout_ms)) / 1000
        deadline = anyio.current_time() + timeout
        for _ in range(10_000):  # bounded: each round is a wake-up or the deadline
            wake = self.notifier.current(requester.user_id)
            response, changed = await self._sync_once(requester, since_token, limit, full_state)
            remaining = deadline - anyio.current_time()
            if since_token is None or full_state or changed or remaining <= 0:
                return response
            self._syncs_waiting.inc()
            try:
                with anyio.move_on_after(remaining):
                    await self.notifier.wait(requester.user_id, wake)
            finally:
                self._syncs_waiting.dec()
        return response

    def _stripped(self, event: dict[str, Any]) -> dict[str, Any]:
        return {k: event[k] for k in ("type", "state_key", "content", "sender") if k in event}

    async def _sync_once(
        self,
        requester: Requester,
        since: SyncToken | None,
        limit: int,
        full_state: bool,
    ) -> tuple[dict[str, Any], bool]:
        user = requester.user_id
        e2ee = await self.e2ee.sync_info(
            user, requester.device_id, None if since is None else (since.to_device, since.keys)
        )
        current = SyncToken(
            await self.store.max_stream(),
            await self.store.max_receipt_stream(),
            self._typing.serial,
            e2ee.to_device_at,
            e2ee.keys_at,
            await self.store.max_account_data(),
        )
        now = self.now_ms()
        rooms: dict[str, dict[str, Any]] = {"join": {}, "invite": {}, "leave": {}}
        if since is None or full_state or since != current:  # else nothing moved anywhere
            found = await self.store.sync_rooms(
                user,
                since=None if since is None else (since.events, since.receipts),
                upto=(current.events, current.receipts),
                limit=limit,
                full_state=full_state,
            )
        else:
            found = []
        for room in found:
            fresh = since is None or full_state or room.stream > since.events
            if room.membership == "join":
                joined = self._joined_room(requester, room, since, current, limit, fresh, now)
                if joined is not None:
                    rooms["join"][room.room_id] = joined
            elif room.membership == "invite" and room.state is not None:
                stripped = [
                    self._stripped(room.state[key])
                    for key in (
                        ("m.room.create", ""),
                        ("m.room.join_rules", ""),
                        ("m.room.name", ""),
                        ("m.room.topic", ""),
                        ("m.room.member", user),
                    )
                    if key in room.state
                ]
                rooms["invite"][room.room_id] = {"invite_state": {"events": stripped}}
            elif room.membership in ("leave", "ban") and since is not None:
                timeline = list(reversed(room.events[:limit]))
                rooms["leave"][room.room_id] = {
                    "timeline": {
                        "events": [self._client(requester, e, now) for e in timeline],
                        "limited": len(room.events) > limit,
                        "prev_batch": str(
                            SyncToken(timeline[0].stream - 1 if timeline else since.events)
                        ),
                    },
                    "state": {"events": []},
                }
        device_changes: list[str] = []
        device_left: list[str] = []
        if since is not None:
            memberships = [
                (e.get("state_key"), e.get("content", {}).get("membership"))
                for kind in ("join", "leave")
                for room in rooms[kind].values()
                for e in room["timeline"]["events"]
                if e.get("type") == "m.room.member"
            ]
            # Users who joined a room we are in: their devices are news to us too.
            joined_now = {u for u, m in memberships if m == "join" and u != user}
            device_changes = sorted({*e2ee.changed, *joined_now})
            # Users who left (or we left) and share no room with us any more: stop tracking.
            parted = {u for u, m in memberships if m in ("leave", "ban") and isinstance(u, str)}
            for room_id in rooms["leave"]:  # rooms we left: their members, unless shared still
                parted |= set(await self.store.room_members(room_id))
            parted.discard(user)
            if parted:
                sharing = set(await self.e2ee.sharing_users(user))
                device_left = sorted(u for u in parted if isinstance(u, str) and u not in sharing)
        account_data: list[dict[str, Any]] = []
        if since is None or since.account < current.account:
            after = 0 if since is None or full_state else since.account
            for room_id, data_type, content in await self.store.account_data_since(
                user, after, current.account
            ):
                event = {"type": data_type, "content": json.loads(content)}
                if not room_id:
                    account_data.append(event)
                    continue
                joined = rooms["join"].get(room_id)
                if joined is None:
                    held = await self.store.membership(room_id, user)
                    if held is None or held[0] != "join":
                        continue
                    joined = rooms["join"][room_id] = _quiet_room(current)
                joined["account_data"]["events"].append(event)
        changed = any(rooms[kind] for kind in rooms) or bool(
            e2ee.to_device or device_changes or account_data
        )
        response = {
            "next_batch": str(current),
            "rooms": rooms,
            "presence": {"events": []},
            "account_data": {"events": account_data},
            "to_device": {"events": e2ee.to_device},
            "device_one_time_keys_count": e2ee.one_time_key_counts,
            "device_unused_fallback_key_types": e2ee.unused_fallback_types,
        }
        if device_changes or device_left:  # left out when empty, as Synapse does
            response["device_lists"] = {"changed": device_changes, "left": device_left}
        return response, changed or e2ee.more

    def _joined_room(
        self,
        requester: Requester,
        room: SyncRoom,
        since: SyncToken | None,
        current: SyncToken,
        limit: int,
        fresh: bool,
        now: int,
    ) -> dict[str, Any] | None:
        room_id = room.room_id
        limited = len(room.events) > limit
        timeline = list(reversed(room.events[:limit]))
        ephemeral: list[dict[str, Any]] = []
        typing_serial = self._typing.room_serial.get(room_id, 0)
        if since is None or typing_serial > since.typing:
            users = self._typing.users(room_id, anyio.current_time())
            if users or since is not None:
                ephemeral.append({"type": "m.typing", "content": {"user_ids": users}})
        content: dict[str, Any] = {}
        for user_id, receipt_type, event_id, ts in room.receipts:
            if receipt_type == "m.read.private" and user_id != requester.user_id:
                continue
            content.setdefault(event_id, {}).setdefault(receipt_type, {})[user_id] = {"ts": ts}
        if content:
            ephemeral.append({"type": "m.receipt", "content": content})
        if not fresh and not timeline and not ephemeral:
            return None
        state_events: list[dict[str, Any]] = []
        if (fresh or limited) and room.state is not None:
            in_timeline = {e.event["event_id"] for e in timeline}
            state_events = [
                client_event(e, now_ms=now) for e in room.state.values()
                if e["event_id"] not in in_timeline
            ]  # fmt: skip
        prev = timeline[0].stream - 1 if timeline else current.events
        return {
            "timeline": {
                "events": [self._client(requester, e, now) for e in timeline],
                "limited": limited,
                "prev_batch": str(SyncToken(prev)),
            },
            "state": {"events": state_events},
            "ephemeral": {"events": ephemeral},
            "account_data": {"events": []},
            "unread_notifications": {},
        }

    # media ---------------------------------------------------------------------------------

    async def upload(
        self, requester: Requester, content_type: str, filename: str | None, data: bytes
    ) -> str:
        media_id = _random_id(24)
        await self.store.put_media(media_id, requester.user_id, content_type[:255],
                                   filename[:255] if filename else None, data,
                                   self.now_ms())  # fmt: skip
        return f"mxc://{self.server_name}/{media_id}"

    async def download(self, server_name: str, media_id: str) -> tuple[str, str | None, bytes]:
        if server_name != self.server_name:
            raise _not_found("remote media is not fetched by this server")
        found = await self.store.get_media(media_id)
        if found is None:
            raise _not_found("no such media")
        return found

    # filters -------------------------------------------------------------------------------

    async def put_filter(self, requester: Requester, user_id: str, body: dict[str, Any]) -> str:
        if user_id != requester.user_id:
            raise forbidden("you can only create your own filters")
        return await self.store.put_filter(user_id, json.dumps(body))

    async def get_filter(self, requester: Requester, user_id: str, filter_id: str) -> Any:
        if user_id != requester.user_id:
            raise forbidden("you can only read your own filters")
        body = await self.store.get_filter(user_id, filter_id)
        if body is None:
            raise _not_found("no such filter")
        return json.loads(body)

    # federation hooks ----------------------------------------------------------------------

    def wire_event(self, event: dict[str, Any]) -> dict[str, Any]:
        return pdu_for_wire(event)
