"""Federation between homeserver-lite instances (a subset of the Matrix server-server API).

- Server keys: ``GET /_matrix/key/v2/server`` (self-signed, Ed25519); other servers' keys are
  fetched from them directly (no notary) and cached until ``valid_until_ts``.
- Requests are authenticated with ``Authorization: X-Matrix`` signatures over the canonical
  JSON of method, URI, origin, destination and body.
- Every event is checked on arrival: content hash, the signature of the sender's server, size,
  and the room's power levels against the *current* state.
- ``PUT /send/{txnId}``: transactions of events; a transaction ID seen before from the same
  origin gets the stored answer and changes nothing.
- ``make_join`` / ``send_join`` (v2) to join a room on another server, ``backfill`` for the
  history before the join.
- Outgoing: each destination has a queue and a sender task that retries with backoff (in
  memory: events not yet delivered when the process stops are not resent after a restart).

Server names are ``host[:port]`` reached directly (``http://`` unless ``--federation-tls``):
no ``.well-known`` or SRV discovery. See docs/homeserver.md for what is simplified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import anyio
import anyio.abc
import httpx
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from teia.errors import FederationError, MatrixError
from teia.homeserver import auth
from teia.homeserver.api import matrix_error_response, parse_json, read_body
from teia.homeserver.e2ee import MAX_QUERY_USERS
from teia.homeserver.events import (
    MAX_PDU_BYTES,
    ROOM_VERSION,
    CanonicalJsonError,
    b64decode,
    b64encode,
    canonical_json,
    check_content_hash,
    compute_event_id,
    content_hash,
    pdu_for_wire,
    sign_event,
    sign_json,
    verify_event_signature,
    verify_signature,
)
from teia.homeserver.keys import VerifyKey
from teia.homeserver.server import Homeserver, server_of
from teia.service.logs import fields

__all__ = ["Federation"]

log = logging.getLogger("teia.homeserver.federation")

F = "/_matrix/federation"
KEY_VALIDITY_MS = 24 * 3600 * 1000
MAX_TXN_PDUS = 50
MAX_TXN_EDUS = 100
MAX_QUEUED_EDUS = 10_000
_X_MATRIX_PARAM = re.compile(r'(\w+)=("[^"]*"|[^,]*)')


def _unauthorized(message: str) -> MatrixError:
    return MatrixError(401, "M_UNAUTHORIZED", message)


def parse_x_matrix(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    if scheme != "X-Matrix":
        raise _unauthorized("expected Authorization: X-Matrix")
    params = {k: v.strip('"') for k, v in _X_MATRIX_PARAM.findall(rest)}
    if not {"origin", "key", "sig"} <= params.keys():
        raise _unauthorized("X-Matrix needs origin, key and sig")
    return params


class Federation:
    """Serves and sends federation requests for one `Homeserver`."""

    def __init__(
        self,
        hs: Homeserver,
        *,
        tls: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.hs = hs
        self.scheme = "https" if tls else "http"
        self._client: httpx.AsyncClient | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._pending_edus: dict[str, list[dict[str, Any]]] = {}
        self._wakeups: dict[str, anyio.Event] = {}
        self._txn_counter = 0
        self._txns = Counter(
            "teia_homeserver_federation_txns_total",
            "federation transactions, by direction and outcome",
            ["direction", "outcome"],
            registry=registry,
        )
        self._pdus = Counter(
            "teia_homeserver_federation_pdus_total",
            "events received over federation, by outcome",
            ["outcome"],
            registry=registry,
        )
        hs.remote_join = self.join
        hs.remote_keys = self.ask_keys
        hs.send_edu = self.queue_edu
        hs.remote_alias = self.ask_alias
        hs.event_listeners.append(self._on_local_event)

    async def __aenter__(self) -> Federation:
        self._client = httpx.AsyncClient(timeout=10.0)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task_group is not None
        assert self._client is not None
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)
        await self._client.aclose()

    # keys ----------------------------------------------------------------------------------

    def key_document(self) -> dict[str, Any]:
        key = self.hs.signing_key
        document = {
            "server_name": self.hs.server_name,
            "verify_keys": {key.key_id: {"key": key.public_b64}},
            "old_verify_keys": {},
            "valid_until_ts": self.hs.now_ms() + KEY_VALIDITY_MS,
        }
        return sign_json(document, self.hs.server_name, key.key_id, key)

    async def verify_key(self, server_name: str, key_id: str) -> VerifyKey:
        """``server_name``'s public key ``key_id``: from the cache, else from the server."""
        if server_name == self.hs.server_name:
            if key_id != self.hs.signing_key.key_id:
                raise FederationError(f"unknown key {key_id} of this server")
            return self.hs.signing_key.public
        now = self.hs.now_ms()
        cached = await self.hs.store.server_key(server_name, key_id, now)
        if cached is None:
            document = await self._get(server_name, "/_matrix/key/v2/server", signed=False)
            keys = document.get("verify_keys") if isinstance(document, dict) else None
            if document.get("server_name") != server_name or not isinstance(keys, dict):
                raise FederationError(f"{server_name} answered a key document for another server")
            found = keys.get(key_id)
            if not isinstance(found, dict) or not isinstance(found.get("key"), str):
                raise FederationError(f"{server_name} has no key {key_id}")
            public = _public_key(found["key"])
            if not verify_signature(document, server_name, key_id, public):
                raise FederationError(f"{server_name}'s key document is not self-signed")
            valid_until = document.get("valid_until_ts")
            valid_until = valid_until if isinstance(valid_until, int) else now + 3600_000
            await self.hs.store.put_server_key(
                server_name, key_id, found["key"], min(valid_until, now + 7 * KEY_VALIDITY_MS)
            )
            return public
        return _public_key(cached)

    async def check_event_signature(self, event: dict[str, Any]) -> None:
        server = server_of(str(event.get("sender", "")))
        signatures = event.get("signatures")
        by_server = signatures.get(server) if isinstance(signatures, dict) else None
        if not isinstance(by_server, dict) or not by_server:
            raise FederationError("the event is not signed by its sender's server")
        for key_id in by_server:
            if not isinstance(key_id, str) or not key_id.startswith("ed25519:"):
                continue
            public = await self.verify_key(server, key_id)
            if verify_event_signature(event, server, key_id, public):
                return
        raise FederationError("the event's signature does not verify")

    # requests ------------------------------------------------------------------------------

    def _auth_header(self, method: str, destination: str, uri: str, content: Any) -> str:
        request: dict[str, Any] = {
            "method": method,
            "uri": uri,
            "origin": self.hs.server_name,
            "destination": destination,
        }
        if content is not None:
            request["content"] = content
        key = self.hs.signing_key
        signature = b64encode(key.sign(canonical_json(request)))
        return (
            f'X-Matrix origin="{self.hs.server_name}",destination="{destination}",'
            f'key="{key.key_id}",sig="{signature}"'
        )

    async def _request(
        self, method: str, destination: str, uri: str, content: Any = None, *, signed: bool = True
    ) -> Any:
        assert self._client is not None, "use Federation as an async context manager"
        headers = {}
        if signed:
            headers["Authorization"] = self._auth_header(method, destination, uri, content)
        body = None if content is None else canonical_json(content)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._client.request(
                method, f"{self.scheme}://{destination}{uri}", content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            raise FederationError(f"{destination} unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise FederationError(f"{destination} answered {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise FederationError(f"{destination} answered something not JSON") from None

    async def _get(self, destination: str, uri: str, *, signed: bool = True) -> Any:
        return await self._request("GET", destination, uri, signed=signed)

    async def authenticate(self, request: Request, content: Any) -> str:
        """The origin of a signed request, or `MatrixError` ``M_UNAUTHORIZED``."""
        header = request.headers.get("authorization")
        if header is None:
            raise _unauthorized("federation requests must be signed (X-Matrix)")
        params = parse_x_matrix(header)
        origin = params["origin"]
        if params.get("destination", self.hs.server_name) != self.hs.server_name:
            raise _unauthorized("the request is for another server")
        uri = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        signed: dict[str, Any] = {
            "method": request.method,
            "uri": uri,
            "origin": origin,
            "destination": self.hs.server_name,
        }
        if content is not None:
            signed["content"] = content
        try:
            public = await self.verify_key(origin, params["key"])
            valid = public.verify(b64decode(params["sig"]), canonical_json(signed))
        except Exception:
            valid = False
        if not valid:
            raise _unauthorized("the request's signature does not verify")
        return origin

    # inbound events ------------------------------------------------------------------------

    async def _check_pdu(self, pdu: Any) -> dict[str, Any]:
        """A received PDU as a stored event, after its shape, hash and signature checks."""
        if not isinstance(pdu, dict):
            raise FederationError("a PDU must be an object")
        for key, kind in (
            ("room_id", str),
            ("sender", str),
            ("type", str),
            ("content", dict),
            ("depth", int),
            ("prev_events", list),
            ("auth_events", list),
            ("origin_server_ts", int),
            ("hashes", dict),
            ("signatures", dict),
        ):
            if not isinstance(pdu.get(key), kind):
                raise FederationError(f"a PDU needs {key}")
        try:
            size = len(canonical_json(pdu))
        except CanonicalJsonError as exc:
            raise FederationError(f"the PDU is not canonical JSON: {exc}") from None
        if size > MAX_PDU_BYTES:
            raise FederationError("the PDU is too large")
        event = pdu_for_wire(pdu)
        if not check_content_hash(event):
            raise FederationError("the PDU's content hash does not match")
        await self.check_event_signature(event)
        event["event_id"] = compute_event_id(event)
        return event

    async def _accept(self, event: dict[str, Any], *, backfilled: bool = False) -> bool:
        """Auth-check and persist a verified event; False if it was already known."""
        hs = self.hs
        async with hs._write_lock:
            if await hs.store.get_event(event["event_id"]) is not None:
                return False
            state = await hs.store.current_state(event["room_id"])
            if not state and event["type"] != "m.room.create":
                raise FederationError("unknown room")
            redacted_sender = None
            if event["type"] == "m.room.redaction" and isinstance(event.get("redacts"), str):
                target = await hs.store.get_event(event["redacts"])
                redacted_sender = target.event["sender"] if target else None
            try:
                auth.check_event(event, state, redacted_sender=redacted_sender)
            except MatrixError as exc:
                raise FederationError(f"refused by the room's rules: {exc}") from None
            await hs._persist(event, local=False)
        self._pdus.labels("backfilled" if backfilled else "accepted").inc()
        return True

    async def on_send(self, request: Request, origin: str, body: Any, txn_id: str) -> Any:
        stored = await self.hs.store.federation_txn(origin, txn_id)
        if stored is not None:
            self._txns.labels("in", "replay").inc()
            return json.loads(stored)
        if not isinstance(body, dict) or not isinstance(body.get("pdus", []), list):
            raise MatrixError(400, "M_BAD_JSON", "a transaction has a list of pdus")
        if body.get("origin", origin) != origin:
            raise MatrixError(403, "M_FORBIDDEN", "the transaction's origin is not the signer")
        pdus = body.get("pdus", [])
        if len(pdus) > MAX_TXN_PDUS:
            raise MatrixError(400, "M_BAD_JSON", f"at most {MAX_TXN_PDUS} pdus per transaction")
        results: dict[str, Any] = {}
        for pdu in pdus:
            event_id = compute_event_id(pdu) if isinstance(pdu, dict) else "?"
            try:
                event = await self._check_pdu(pdu)
                await self._accept(event)
                results[event_id] = {}
            except (FederationError, CanonicalJsonError, KeyError, TypeError) as exc:
                self._pdus.labels("refused").inc()
                log.info("pdu refused", extra=fields(origin=origin, reason=str(exc)[:200]))
                results[event_id] = {"error": str(exc)[:200]}
        await self.on_edus(origin, body.get("edus", []))
        response = {"pdus": results}
        await self.hs.store.put_federation_txn(origin, txn_id, json.dumps(response))
        self._txns.labels("in", "ok").inc()
        return response

    async def _join_template(self, room_id: str, user_id: str) -> dict[str, Any]:
        hs = self.hs
        state = await hs.store.current_state(room_id)
        if not state:
            raise MatrixError(404, "M_NOT_FOUND", "unknown room")
        extremities = await hs.store.extremities(room_id)
        wanted = [
            ("m.room.create", ""),
            ("m.room.power_levels", ""),
            ("m.room.join_rules", ""),
            ("m.room.member", user_id),
        ]
        event: dict[str, Any] = {
            "room_id": room_id,
            "sender": user_id,
            "type": "m.room.member",
            "state_key": user_id,
            "content": {"membership": "join"},
            "origin_server_ts": hs.now_ms(),
            "depth": max((d for _, d in extremities), default=0) + 1,
            "prev_events": [e for e, _ in extremities],
            "auth_events": sorted({state[k]["event_id"] for k in wanted if k in state}),
        }
        try:
            auth.check_event({**event, "event_id": "$template"}, state)
        except MatrixError:
            raise MatrixError(403, "M_FORBIDDEN", "that user may not join this room") from None
        return event

    async def on_make_join(self, origin: str, room_id: str, user_id: str) -> Any:
        if server_of(user_id) != origin:
            raise MatrixError(403, "M_FORBIDDEN", "the user is not on the requesting server")
        return {"event": await self._join_template(room_id, user_id), "room_version": ROOM_VERSION}

    async def on_send_join(self, origin: str, room_id: str, event_id: str, body: Any) -> Any:
        try:
            event = await self._check_pdu(body)
        except FederationError as exc:
            raise MatrixError(400, "M_BAD_JSON", str(exc)) from None
        if (
            event["event_id"] != event_id
            or event["room_id"] != room_id
            or event["type"] != "m.room.member"
            or event.get("state_key") != event["sender"]
            or server_of(event["sender"]) != origin
            or event["content"].get("membership") != "join"
        ):
            raise MatrixError(400, "M_BAD_JSON", "not a join of a user of the requesting server")
        try:
            await self._accept(event)
        except FederationError as exc:
            raise MatrixError(403, "M_FORBIDDEN", str(exc)) from None
        self._fan_out(event, exclude={origin})
        state = await self.hs.store.current_state(room_id)
        return {
            "origin": self.hs.server_name,
            "state": [pdu_for_wire(e) for e in state.values()],
            "auth_chain": [],
            "event": pdu_for_wire(event),
        }

    async def on_backfill(self, origin: str, room_id: str, request: Request) -> Any:
        members = await self.hs.store.room_members(room_id, ("join", "invite"))
        state = await self.hs.store.current_state(room_id)
        rules = state.get(("m.room.join_rules", ""), {}).get("content", {})
        if not any(server_of(m) == origin for m in members) and rules.get("join_rule") != "public":
            raise MatrixError(403, "M_FORBIDDEN", "no user of your server is in this room")
        try:
            limit = max(1, min(int(request.query_params.get("limit", "100")), 1000))
        except ValueError:
            raise MatrixError(400, "M_INVALID_PARAM", "limit must be an integer") from None
        upto = 0
        for stored in await self.hs.store.events_by_id(request.query_params.getlist("v")):
            if stored.event["room_id"] == room_id:
                upto = max(upto, stored.stream)
        events = await self.hs.store.room_events(
            room_id, after=0, upto=upto, limit=limit, newest_first=True
        )
        return {
            "origin": self.hs.server_name,
            "origin_server_ts": self.hs.now_ms(),
            "pdus": [pdu_for_wire(e.event) for e in events],
        }

    # outbound ------------------------------------------------------------------------------

    async def _on_local_event(self, event: dict[str, Any]) -> None:
        self._fan_out(event, exclude=set())

    def queue_edu(self, destination: str, edu: dict[str, Any]) -> None:
        """Send an EDU to ``destination`` with its next transaction (bounded queue: past
        `MAX_QUEUED_EDUS` the oldest are dropped, as EDUs are best effort)."""
        if self._task_group is None or destination in ("", self.hs.server_name):
            return
        queue = self._pending_edus.setdefault(destination, [])
        queue.append(edu)
        del queue[:-MAX_QUEUED_EDUS]
        self._wake(destination)

    def _wake(self, destination: str) -> None:
        assert self._task_group is not None
        if destination not in self._wakeups:
            self._wakeups[destination] = anyio.Event()
            self._task_group.start_soon(self._sender, destination)
        self._wakeups[destination].set()

    async def ask_alias(self, destination: str, alias: str) -> Any:
        """``/query/directory`` on the server an alias belongs to (10 s at most)."""
        with anyio.fail_after(10):
            return await self._get(
                destination, f"{F}/v1/query/directory?room_alias={quote(alias, safe='')}"
            )

    async def ask_keys(self, destination: str, kind: str, body: dict[str, Any]) -> Any:
        """``/user/keys/query`` or ``/user/keys/claim`` on another server."""
        return await self._request("POST", destination, f"{F}/v1/user/keys/{kind}", body)

    async def on_edus(self, origin: str, edus: Any) -> None:
        """The EDUs of a transaction: to-device messages and device-list updates are taken,
        other kinds ignored; one that is refused does not stop the others."""
        if not isinstance(edus, list):
            raise MatrixError(400, "M_BAD_JSON", "edus must be a list")
        if len(edus) > MAX_TXN_EDUS:
            raise MatrixError(400, "M_BAD_JSON", f"at most {MAX_TXN_EDUS} edus per transaction")
        for edu in edus:
            if not isinstance(edu, dict):
                continue
            kind, content = edu.get("edu_type"), edu.get("content")
            try:
                if kind == "m.direct_to_device":
                    await self.hs.direct_to_device(origin, content)
                elif kind == "m.device_list_update":
                    await self.hs.device_list_update(origin, content)
                elif kind == "m.typing":
                    await self.hs.remote_typing(origin, content)
                elif kind == "m.receipt":
                    await self.hs.remote_receipts(origin, content)
            except MatrixError as exc:
                log.info("edu refused", extra=fields(origin=origin, reason=str(exc)[:200]))

    def _fan_out(self, event: dict[str, Any], exclude: set[str]) -> None:
        if self._task_group is None:
            return
        task_group = self._task_group

        async def route() -> None:
            members = await self.hs.store.room_members(event["room_id"], ("join", "invite"))
            targets = {server_of(m) for m in members}
            if event["type"] == "m.room.member":
                targets.add(server_of(str(event.get("state_key", ""))))
            for destination in targets - exclude - {self.hs.server_name, ""}:
                self._pending.setdefault(destination, []).append(pdu_for_wire(event))
                self._wake(destination)

        task_group.start_soon(route)

    async def _sender(self, destination: str) -> None:
        """Deliver ``destination``'s queue in transactions, in order, retrying with backoff."""
        backoff = 0.5
        while True:
            pending = self._pending.setdefault(destination, [])
            pending_edus = self._pending_edus.setdefault(destination, [])
            if not pending and not pending_edus:
                wake = self._wakeups[destination] = anyio.Event()
                await wake.wait()
                continue
            batch = pending[:MAX_TXN_PDUS]
            edus = pending_edus[:MAX_TXN_EDUS]
            self._txn_counter += 1
            txn_id = f"{int(time.time() * 1000)}.{self._txn_counter}"
            body = {
                "origin": self.hs.server_name,
                "origin_server_ts": self.hs.now_ms(),
                "pdus": batch,
                "edus": edus,
            }
            while True:
                try:
                    await self._request("PUT", destination, f"{F}/v1/send/{txn_id}", body)
                except FederationError as exc:
                    self._txns.labels("out", "retry").inc()
                    log.info(
                        "federation send failed",
                        extra=fields(destination=destination, reason=str(exc)),
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                break
            backoff = 0.5
            self._txns.labels("out", "ok").inc()
            del pending[: len(batch)]
            # EDUs queued meanwhile stay; the oldest may have been dropped past the bound.
            for edu in edus:
                with contextlib.suppress(ValueError):
                    pending_edus.remove(edu)

    # joining -------------------------------------------------------------------------------

    async def join(self, user_id: str, room_id: str, servers: list[str]) -> None:
        """Join ``room_id`` through the first of ``servers`` that lets us in."""
        reasons = []
        for server in servers:
            try:
                await self._join_via(user_id, room_id, server)
                return
            except FederationError as exc:
                reasons.append(f"{server}: {exc}")
        raise MatrixError(
            404, "M_NOT_FOUND", "could not join over federation: " + "; ".join(reasons)
        )

    async def _join_via(self, user_id: str, room_id: str, server: str) -> None:
        answer = await self._get(server, f"{F}/v1/make_join/{room_id}/{user_id}?ver={ROOM_VERSION}")
        template = answer.get("event") if isinstance(answer, dict) else None
        if not isinstance(template, dict) or template.get("room_id") != room_id:
            raise FederationError("make_join answered no event template")
        if answer.get("room_version", "1") != ROOM_VERSION:
            raise FederationError(f"room version {answer.get('room_version')} is not supported")
        await self.hs.store.create_room(room_id, ROOM_VERSION, self.hs.now_ms())
        await self._backfill(server, room_id, list(template.get("prev_events", [])))
        join = {
            k: template[k]
            for k in (
                "room_id",
                "sender",
                "type",
                "state_key",
                "content",
                "origin_server_ts",
                "depth",
                "prev_events",
                "auth_events",
            )
            if k in template
        }
        if join.get("sender") != user_id or join.get("content") != {"membership": "join"}:
            raise FederationError("make_join answered a template for something else")
        join["hashes"] = {"sha256": content_hash(join)}
        key = self.hs.signing_key
        sign_event(join, self.hs.server_name, key.key_id, key)
        event_id = compute_event_id(join)
        answer = await self._request("PUT", server, f"{F}/v2/send_join/{room_id}/{event_id}", join)
        for pdu in answer.get("state", []) if isinstance(answer, dict) else []:
            try:
                await self._accept(await self._check_pdu(pdu), backfilled=True)
            except FederationError as exc:
                log.info("state event refused", extra=fields(reason=str(exc)[:200]))
        await self._accept({**join, "event_id": event_id})

    async def _backfill(self, server: str, room_id: str, heads: list[str]) -> None:
        """Fetch the room's history before ``heads`` from ``server`` and store it in order."""
        received: dict[str, dict[str, Any]] = {}
        frontier = [h for h in heads if isinstance(h, str)]
        for _ in range(1000):  # bounded: each page goes further back or ends the loop
            if not frontier:
                break
            query = "&".join(f"v={v}" for v in frontier[:20])
            page = await self._get(server, f"{F}/v1/backfill/{room_id}?{query}&limit=500")
            pdus = page.get("pdus", []) if isinstance(page, dict) else []
            new = 0
            for pdu in pdus if isinstance(pdus, list) else []:
                try:
                    event = await self._check_pdu(pdu)
                except FederationError as exc:
                    log.info("backfilled event refused", extra=fields(reason=str(exc)[:200]))
                    continue
                if event["room_id"] == room_id and event["event_id"] not in received:
                    received[event["event_id"]] = event
                    new += 1
            if not new:
                break
            missing = {p for e in received.values() for p in e.get("prev_events", [])}
            frontier = sorted(missing - received.keys())
        for event in sorted(received.values(), key=lambda e: (e["depth"], e["origin_server_ts"])):
            try:
                await self._accept(event, backfilled=True)
            except FederationError as exc:
                log.info("backfilled event refused", extra=fields(reason=str(exc)[:200]))

    # routes --------------------------------------------------------------------------------

    def _route(
        self,
        path: str,
        methods: list[str],
        handler: Callable[[Request, str, Any], Awaitable[Any]],
        *,
        signed: bool = True,
    ) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                body = None
                if request.method in ("PUT", "POST"):
                    body = parse_json(
                        await read_body(request, self.hs.settings.max_request_bytes * MAX_TXN_PDUS)
                    )
                origin = await self.authenticate(request, body) if signed else ""
                return JSONResponse(await handler(request, origin, body))
            except MatrixError as exc:
                return matrix_error_response(exc)
            except Exception:
                log.exception("federation request failed")
                return matrix_error_response(MatrixError(500, "M_UNKNOWN", "internal error"))

        return Route(path, endpoint, methods=methods)

    def routes(self) -> list[Route]:
        p = "path_params"

        async def keys(request: Request, origin: str, body: Any) -> Any:
            return self.key_document()

        async def send(request: Request, origin: str, body: Any) -> Any:
            return await self.on_send(request, origin, body, getattr(request, p)["txn"])

        async def make_join(request: Request, origin: str, body: Any) -> Any:
            params = getattr(request, p)
            return await self.on_make_join(origin, params["room"], params["user"])

        async def send_join(request: Request, origin: str, body: Any) -> Any:
            params = getattr(request, p)
            return await self.on_send_join(origin, params["room"], params["event"], body)

        async def backfill(request: Request, origin: str, body: Any) -> Any:
            return await self.on_backfill(origin, getattr(request, p)["room"], request)

        async def keys_query(request: Request, origin: str, body: Any) -> Any:
            wanted = body.get("device_keys") if isinstance(body, dict) else None
            local = {u: d for u, d in self._ours(wanted).items() if isinstance(d, list)}
            found = await self.hs.e2ee.query(
                {u: [x for x in d if isinstance(x, str)] for u, d in local.items()}
            )
            return {"device_keys": found}

        async def keys_claim(request: Request, origin: str, body: Any) -> Any:
            wanted = body.get("one_time_keys") if isinstance(body, dict) else None
            local = {
                u: {d: a for d, a in devices.items() if isinstance(a, str)}
                for u, devices in self._ours(wanted).items()
                if isinstance(devices, dict)
            }
            return {"one_time_keys": await self.hs.e2ee.claim(local)}

        async def query_directory(request: Request, origin: str, body: Any) -> Any:
            alias = request.query_params.get("room_alias")
            if alias is None:
                raise MatrixError(400, "M_MISSING_PARAM", "room_alias is required")
            return await self.hs.directory.local_alias(alias)

        async def version(request: Request, origin: str, body: Any) -> Any:
            return {"server": {"name": "teia homeserver-lite", "version": "0.1"}}

        return [
            self._route("/_matrix/key/v2/server", ["GET"], keys, signed=False),
            self._route(F + "/v1/version", ["GET"], version, signed=False),
            self._route(F + "/v1/send/{txn}", ["PUT"], send),
            self._route(F + "/v1/make_join/{room}/{user}", ["GET"], make_join),
            self._route(F + "/v2/send_join/{room}/{event}", ["PUT"], send_join),
            self._route(F + "/v1/backfill/{room}", ["GET"], backfill),
            self._route(F + "/v1/query/directory", ["GET"], query_directory),
            self._route(F + "/v1/user/keys/query", ["POST"], keys_query),
            self._route(F + "/v1/user/keys/claim", ["POST"], keys_claim),
        ]

    def _ours(self, wanted: Any) -> dict[str, Any]:
        """The users of this server in a keys query or claim (at most `MAX_QUERY_USERS`)."""
        if not isinstance(wanted, dict):
            raise MatrixError(400, "M_BAD_JSON", "the request names users")
        if len(wanted) > MAX_QUERY_USERS:
            raise MatrixError(400, "M_LIMIT_EXCEEDED", f"at most {MAX_QUERY_USERS} users")
        return {u: v for u, v in wanted.items() if isinstance(u, str) and self.hs.is_local(u)}


def _public_key(text: str) -> VerifyKey:
    try:
        return VerifyKey.from_b64(text)
    except ValueError:
        raise FederationError("a malformed Ed25519 key") from None
