"""The Matrix client-server API (v3 subset) as an ASGI application (Starlette).

Every handler gets JSON in and JSON out through `_handler`, which also authenticates (token
by ``Authorization: Bearer`` header or ``access_token`` query parameter), enforces body size
limits *while reading* (a lying ``Content-Length`` does not help), applies the per-address and
per-user rate limits, and turns every refusal into a Matrix error body. Nothing a client sends
is logged: only the endpoint, status and timing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from teia.errors import MatrixError
from teia.homeserver.events import CanonicalJsonError, check_canonical
from teia.homeserver.ratelimit import RateLimiter
from teia.homeserver.server import Homeserver, Requester, bad_json
from teia.service.logs import fields

__all__ = ["ApiLimits", "Call", "ClientApi", "access_token", "build_app"]

log = logging.getLogger("teia.homeserver")

CLIENT = "/_matrix/client/v3"
VERSIONS = [f"v1.{n}" for n in range(1, 12)] + ["r0.6.1"]


@dataclass(frozen=True)
class ApiLimits:
    """Per-address and per-user request rates (requests/s and burst)."""

    ip_rate: float = 50.0
    ip_burst: float = 200.0
    user_rate: float = 20.0
    user_burst: float = 100.0


@dataclass
class Call:
    """What a handler receives."""

    request: Request
    requester: Requester | None
    body: Any
    raw: bytes

    @property
    def user(self) -> Requester:
        assert self.requester is not None
        return self.requester

    def param(self, name: str) -> str:
        return str(self.request.path_params[name])

    def optional_param(self, name: str) -> str | None:
        value = self.request.path_params.get(name)
        return None if value is None else str(value)

    def query(self, name: str) -> str | None:
        return self.request.query_params.get(name)

    def query_int(self, name: str, default: int) -> int:
        value = self.request.query_params.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise MatrixError(400, "M_INVALID_PARAM", f"{name} must be an integer") from None

    def field(self, name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
        if not isinstance(self.body, dict):
            raise bad_json("the body must be a JSON object")
        if name not in self.body:
            if required:
                raise MatrixError(400, "M_MISSING_PARAM", f"missing {name}")
            return None
        value = self.body[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise bad_json(f"{name} has the wrong type")
        return value


Handler = Callable[[Call], Awaitable[Any]]


def matrix_error_response(exc: MatrixError) -> JSONResponse:
    body = {"errcode": exc.errcode, "error": str(exc), **exc.extra}
    headers = dict(_CORS)
    if getattr(exc, "close_connection", False):
        # The rest of the body was never read: the connection cannot carry another request.
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=exc.status, headers=headers)


_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Origin, X-Requested-With, Content-Type, Accept, Authorization",
}


def access_token(request: Request) -> str | None:
    """The token of a request: ``Authorization: Bearer`` or the ``access_token`` parameter."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise MatrixError(401, "M_MISSING_TOKEN", "use Authorization: Bearer <token>")
        return value.strip()
    return request.query_params.get("access_token")


_DRAIN_BYTES = 1024 * 1024
"""How much of an oversize body is read and dropped so the connection can carry on."""


def _too_large(limit: int, *, drained: bool) -> MatrixError:
    exc = MatrixError(413, "M_TOO_LARGE", f"the body is larger than {limit} bytes")
    exc.close_connection = not drained  # type: ignore[attr-defined]
    return exc


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with ``M_TOO_LARGE`` once it exceeds ``limit``: nothing of it
    is kept; up to 1 MiB more is read and dropped so that the client sees the answer (past
    that, the connection is closed)."""
    declared = request.headers.get("content-length")
    oversize = declared is not None and declared.isdigit() and int(declared) > limit
    if oversize and int(str(declared)) > limit + _DRAIN_BYTES:
        raise _too_large(limit, drained=False)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + _DRAIN_BYTES:
            raise _too_large(limit, drained=False)
        if size > limit:
            oversize = True
            chunks.clear()
        elif not oversize:
            chunks.append(chunk)
    if oversize:
        raise _too_large(limit, drained=True)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MatrixError(400, "M_NOT_JSON", "the body is not valid JSON") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class ClientApi:
    """Routes of the client-server API over one `Homeserver`."""

    def __init__(
        self, hs: Homeserver, limits: ApiLimits, registry: CollectorRegistry | None
    ) -> None:
        self.hs = hs
        self.limits = limits
        self._ip_limiter = RateLimiter(limits.ip_rate, limits.ip_burst)
        self._user_limiter = RateLimiter(limits.user_rate, limits.user_burst)
        self._requests = Counter(
            "teia_homeserver_requests_total",
            "HTTP requests, by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self._latency = Histogram(
            "teia_homeserver_request_seconds",
            "request handling time (syncs excluded)",
            ["endpoint"],
            registry=registry,
        )
        self._limited = Counter(
            "teia_homeserver_rate_limited_total",
            "requests refused by a rate limit, by key kind",
            ["kind"],
            registry=registry,
        )

    def _rate(self, kind: str, key: str) -> None:
        limiter = self._ip_limiter if kind == "ip" else self._user_limiter
        wait = limiter.take(key, time.monotonic())
        if wait > 0:
            self._limited.labels(kind).inc()
            raise MatrixError(
                429, "M_LIMIT_EXCEEDED", "too many requests", retry_after_ms=int(wait * 1000) + 1
            )

    def route(
        self,
        path: str,
        handler: Handler,
        methods: list[str],
        *,
        name: str,
        auth: bool = True,
        body: str = "json",
        user_limit: bool = True,
        optional_auth: bool = False,
        canonical: bool = True,
    ) -> Route:
        limit = (
            self.hs.settings.max_upload_bytes
            if body == "raw"
            else self.hs.settings.max_request_bytes
        )

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            status = 500
            try:
                response = await self._call(
                    request, handler, auth=auth, optional_auth=optional_auth, body=body,
                    limit=limit, user_limit=user_limit, canonical=canonical,
                )  # fmt: skip
                status = response.status_code
                return response
            except MatrixError as exc:
                status = exc.status
                return matrix_error_response(exc)
            except Exception:
                log.exception("request failed", extra=fields(endpoint=name))
                return matrix_error_response(MatrixError(500, "M_UNKNOWN", "internal error"))
            finally:
                self._requests.labels(name, str(status)).inc()
                if name != "sync":
                    self._latency.labels(name).observe(time.perf_counter() - started)

        return Route(path, endpoint, methods=methods, name=name)

    async def _call(
        self,
        request: Request,
        handler: Handler,
        *,
        auth: bool,
        optional_auth: bool,
        body: str,
        limit: int,
        user_limit: bool,
        canonical: bool = True,
    ) -> Response:
        address = request.client.host if request.client else "unknown"
        self._rate("ip", address)
        requester = None
        if auth or optional_auth:
            token = access_token(request)
            if token is None:
                if auth:
                    raise MatrixError(401, "M_MISSING_TOKEN", "an access token is required")
            else:
                requester = await self.hs.authenticate(token)
                if user_limit:
                    self._rate("user", requester.user_id)
        raw = b""
        parsed: Any = None
        if request.method in ("POST", "PUT", "DELETE"):
            raw = await read_body(request, limit)
            if request.method == "DELETE" and not raw.strip():
                raw = b"{}"  # a DELETE may come without a body
            if body == "json":
                parsed = parse_json(raw)
                if not isinstance(parsed, dict):
                    raise bad_json("the body must be a JSON object")
                try:
                    if canonical:  # what may end up in a signed event
                        check_canonical(parsed)
                except CanonicalJsonError as exc:
                    raise bad_json(f"not representable in canonical JSON: {exc}") from None
        result = await handler(Call(request, requester, parsed, raw))
        if isinstance(result, Response):
            return result
        return JSONResponse(result, headers=_CORS)

    # handlers --------------------------------------------------------------------------

    async def versions(self, call: Call) -> Any:
        return {"versions": VERSIONS, "unstable_features": {}}

    async def login_flows(self, call: Call) -> Any:
        return {"flows": [{"type": "m.login.password"}]}

    async def login(self, call: Call) -> Any:
        kind = call.field("type", str)
        if kind != "m.login.password":
            raise MatrixError(400, "M_UNKNOWN", "only m.login.password is supported")
        identifier = call.field("identifier", dict, required=False)
        user = None
        if identifier is not None:
            if identifier.get("type") != "m.id.user" or not isinstance(identifier.get("user"), str):
                raise MatrixError(400, "M_UNKNOWN", "identifier must be of type m.id.user")
            user = identifier["user"]
        else:
            user = call.field("user", str)
        password = call.field("password", str)
        device = call.field("device_id", str, required=False)
        name = call.field("initial_device_display_name", str, required=False)
        return await self.hs.login(user, password, device, name)

    async def register(self, call: Call) -> Any:
        if call.query("kind") == "guest":
            raise MatrixError(403, "M_GUEST_ACCESS_FORBIDDEN", "guest accounts are disabled")
        if not self.hs.settings.registration_open:
            raise MatrixError(403, "M_FORBIDDEN", "registration is closed on this server")
        auth = call.field("auth", dict, required=False)
        if auth is None or auth.get("type") != "m.login.dummy":
            session = auth.get("session") if isinstance(auth, dict) else None
            raise MatrixError(
                401, "M_FORBIDDEN", "complete the m.login.dummy stage",
                flows=[{"stages": ["m.login.dummy"]}], params={},
                session=session if isinstance(session, str) else "dummy",
            )  # fmt: skip
        username = call.field("username", str, required=False)
        password = call.field("password", str)
        device = call.field("device_id", str, required=False)
        inhibit = call.field("inhibit_login", bool, required=False) is True
        name = call.field("initial_device_display_name", str, required=False)
        return await self.hs.register(username, password, device, inhibit, name)

    async def available(self, call: Call) -> Any:
        username = call.query("username")
        if not username:
            raise MatrixError(400, "M_MISSING_PARAM", "missing username")
        await self.hs.username_available(username.lower())
        return {"available": True}

    async def logout(self, call: Call) -> Any:
        await self.hs.logout(call.user)
        return {}

    async def logout_all(self, call: Call) -> Any:
        await self.hs.logout(call.user, everywhere=True)
        return {}

    async def whoami(self, call: Call) -> Any:
        return {"user_id": call.user.user_id, "device_id": call.user.device_id}

    async def capabilities(self, call: Call) -> Any:
        return {
            "capabilities": {
                "m.change_password": {"enabled": False},
                "m.room_versions": {"default": "10", "available": {"10": "stable"}},
                "m.set_displayname": {"enabled": True},
            }
        }

    async def create_room(self, call: Call) -> Any:
        return {"room_id": await self.hs.create_room(call.user, call.body)}

    async def join(self, call: Call) -> Any:
        room_id = call.param("room")
        if not room_id.startswith(("!", "#")):
            raise MatrixError(400, "M_INVALID_PARAM", "a room ID (!…) or alias (#…)")
        servers = call.request.query_params.getlist(
            "server_name"
        ) + call.request.query_params.getlist("via")
        return {"room_id": await self.hs.join(call.user, room_id, servers)}

    async def put_alias(self, call: Call) -> Any:
        await self.hs.directory.create_alias(
            call.user, call.param("alias"), call.field("room_id", str)
        )
        return {}

    async def get_alias(self, call: Call) -> Any:
        room_id, servers = await self.hs.directory.resolve(call.param("alias"))
        return {"room_id": room_id, "servers": servers}

    async def delete_alias(self, call: Call) -> Any:
        await self.hs.directory.delete_alias(call.user, call.param("alias"))
        return {}

    async def room_aliases(self, call: Call) -> Any:
        return {"aliases": await self.hs.directory.room_aliases(call.user, call.param("room"))}

    async def get_visibility(self, call: Call) -> Any:
        return {"visibility": await self.hs.directory.visibility(call.param("room"))}

    async def put_visibility(self, call: Call) -> Any:
        await self.hs.directory.set_visibility(
            call.user, call.param("room"), call.body.get("visibility")
        )
        return {}

    async def public_rooms(self, call: Call) -> Any:
        if call.request.method == "GET":
            limit = call.query_int("limit", 100) if call.query("limit") else None
            return await self.hs.directory.public_rooms(limit, call.query("since"), None)
        search = call.body.get("filter") if isinstance(call.body, dict) else None
        term = search.get("generic_search_term") if isinstance(search, dict) else None
        return await self.hs.directory.public_rooms(
            call.body.get("limit"), call.body.get("since"), term
        )

    def _membership(self, membership: str, *, self_target: bool = False) -> Handler:
        async def handler(call: Call) -> Any:
            target = call.user.user_id if self_target else call.field("user_id", str)
            reason = (
                call.field("reason", str, required=False) if isinstance(call.body, dict) else None
            )
            await self.hs.membership(call.user, call.param("room"), target, membership, reason)
            return {}

        return handler

    async def send(self, call: Call) -> Any:
        event_id = await self.hs.send(
            call.user, call.param("room"), call.param("type"), call.body,
            txn_id=call.param("txn"),
        )  # fmt: skip
        return {"event_id": event_id}

    async def put_state(self, call: Call) -> Any:
        key = call.request.path_params.get("key", "")
        event_id = await self.hs.send(
            call.user, call.param("room"), call.param("type"), call.body, state_key=key
        )
        return {"event_id": event_id}

    async def get_state(self, call: Call) -> Any:
        return await self.hs.room_state(call.user, call.param("room"))

    async def get_state_event(self, call: Call) -> Any:
        key = call.request.path_params.get("key", "")
        return await self.hs.state_event(call.user, call.param("room"), call.param("type"), key)

    async def get_event(self, call: Call) -> Any:
        return await self.hs.room_event(call.user, call.param("room"), call.param("event"))

    async def joined_members(self, call: Call) -> Any:
        return await self.hs.joined_members(call.user, call.param("room"))

    async def members(self, call: Call) -> Any:
        return await self.hs.members(call.user, call.param("room"))

    async def messages(self, call: Call) -> Any:
        return await self.hs.messages(
            call.user, call.param("room"), call.query("from"), call.query("dir") or "b",
            call.query_int("limit", 10),
        )  # fmt: skip

    async def redact(self, call: Call) -> Any:
        reason = call.body.get("reason") if isinstance(call.body, dict) else None
        event_id = await self.hs.redact(
            call.user, call.param("room"), call.param("event"), call.param("txn"), reason
        )
        return {"event_id": event_id}

    async def typing(self, call: Call) -> Any:
        typing = call.field("typing", bool)
        timeout = call.field("timeout", int, required=False) or 30_000
        await self.hs.set_typing(call.user, call.param("room"), call.param("user"), typing, timeout)
        return {}

    async def receipt(self, call: Call) -> Any:
        await self.hs.receipt(
            call.user, call.param("room"), call.param("kind"), call.param("event")
        )
        return {}

    async def read_markers(self, call: Call) -> Any:
        for kind in ("m.fully_read", "m.read", "m.read.private"):
            event_id = call.field(kind, str, required=False)
            if event_id is not None:
                await self.hs.receipt(call.user, call.param("room"), kind, event_id)
        return {}

    async def joined_rooms(self, call: Call) -> Any:
        return {"joined_rooms": await self.hs.joined_rooms(call.user)}

    async def sync(self, call: Call) -> Any:
        limit = None
        filter_param = call.query("filter")
        if filter_param:
            if filter_param.startswith("{"):
                try:
                    definition = json.loads(filter_param)
                except ValueError:
                    raise MatrixError(400, "M_NOT_JSON", "filter is not valid JSON") from None
            else:
                definition = await self.hs.get_filter(call.user, call.user.user_id, filter_param)
            limit = _timeline_limit(definition)
        full_state = call.query("full_state") == "true"
        return await self.hs.sync(
            call.user, call.query("since"), call.query_int("timeout", 0), limit, full_state
        )

    async def devices(self, call: Call) -> Any:
        return {"devices": await self.hs.devices(call.user)}

    async def device(self, call: Call) -> Any:
        return await self.hs.device(call.user, call.param("device"))

    async def rename_device(self, call: Call) -> Any:
        await self.hs.rename_device(call.user, call.param("device"), call.body.get("display_name"))
        return {}

    async def delete_device(self, call: Call) -> Any:
        device = call.param("device")
        await self.hs.device(call.user, device)
        body = call.body if isinstance(call.body, dict) else {}
        await self.hs.delete_devices(call.user, [device], body.get("auth"))
        return {}

    async def delete_devices(self, call: Call) -> Any:
        devices = call.field("devices", list)
        if len(devices) > 100 or not all(isinstance(d, str) for d in devices):
            raise MatrixError(400, "M_BAD_JSON", "devices: at most 100 device IDs")
        await self.hs.delete_devices(call.user, devices, call.body.get("auth"))
        return {}

    async def put_account_data(self, call: Call) -> Any:
        room = call.optional_param("room") or ""
        await self.hs.put_account_data(
            call.user, call.param("user"), room, call.param("type"), call.body
        )
        return {}

    async def get_account_data(self, call: Call) -> Any:
        room = call.optional_param("room") or ""
        return await self.hs.get_account_data(
            call.user, call.param("user"), room, call.param("type")
        )

    async def keys_upload(self, call: Call) -> Any:
        return await self.hs.keys_upload(call.user, call.body)

    async def keys_query(self, call: Call) -> Any:
        return await self.hs.keys_query(call.user, call.body)

    async def keys_claim(self, call: Call) -> Any:
        return await self.hs.keys_claim(call.user, call.body)

    async def keys_changes(self, call: Call) -> Any:
        start, end = call.query("from"), call.query("to")
        if start is None or end is None:
            raise MatrixError(400, "M_MISSING_PARAM", "from and to are required")
        return await self.hs.keys_changes(call.user, start, end)

    async def send_to_device(self, call: Call) -> Any:
        return await self.hs.send_to_device(
            call.user, call.param("type"), call.param("txn"), call.body
        )

    async def openid_token(self, call: Call) -> Any:
        return await self.hs.openid_token(call.user, call.param("user"))

    async def openid_userinfo(self, call: Call) -> Any:
        token = call.query("access_token")
        if not token:
            raise MatrixError(401, "M_MISSING_TOKEN", "access_token is required")
        return {"sub": await self.hs.openid_userinfo(token)}

    async def profile(self, call: Call) -> Any:
        return await self.hs.profile(call.param("user"))

    async def get_displayname(self, call: Call) -> Any:
        profile = await self.hs.profile(call.param("user"))
        return {"displayname": profile.get("displayname")}

    async def set_displayname(self, call: Call) -> Any:
        await self.hs.set_displayname(call.user, call.param("user"), call.body.get("displayname"))
        return {}

    async def user_search(self, call: Call) -> Any:
        term = call.field("search_term", str)
        limit = call.field("limit", int, required=False) or 10
        return await self.hs.search_users(term, limit)

    async def put_filter(self, call: Call) -> Any:
        return {"filter_id": await self.hs.put_filter(call.user, call.param("user"), call.body)}

    async def get_filter(self, call: Call) -> Any:
        return await self.hs.get_filter(call.user, call.param("user"), call.param("filter"))

    async def media_config(self, call: Call) -> Any:
        return {"m.upload.size": self.hs.settings.max_upload_bytes}

    async def upload(self, call: Call) -> Any:
        content_type = call.request.headers.get("content-type", "application/octet-stream")
        uri = await self.hs.upload(call.user, content_type, call.query("filename"), call.raw)
        return {"content_uri": uri}

    async def download(self, call: Call) -> Any:
        content_type, filename, data = await self.hs.download(
            call.param("server"), call.param("media")
        )
        headers = {
            "Content-Security-Policy": "sandbox; default-src 'none'",
            "X-Content-Type-Options": "nosniff",
            **_CORS,
        }
        name = call.request.path_params.get("filename") or filename
        if name:
            safe = "".join(c for c in name if c.isalnum() or c in "._- ")[:200]
            headers["Content-Disposition"] = f'attachment; filename="{safe}"'
        return Response(data, media_type=content_type, headers=headers)

    def routes(self) -> list[Route]:
        r = self.route
        room = CLIENT + "/rooms/{room}"
        routes = [
            r("/_matrix/client/versions", self.versions, ["GET"], name="versions", auth=False),
            r(CLIENT + "/login", self.login_flows, ["GET"], name="login_flows", auth=False),
            r(CLIENT + "/login", self.login, ["POST"], name="login", auth=False),
            r(CLIENT + "/register", self.register, ["POST"], name="register", auth=False),
            r(CLIENT + "/register/available", self.available, ["GET"], name="available",
              auth=False),
            r(CLIENT + "/logout", self.logout, ["POST"], name="logout"),
            r(CLIENT + "/logout/all", self.logout_all, ["POST"], name="logout_all"),
            r(CLIENT + "/account/whoami", self.whoami, ["GET"], name="whoami"),
            r(CLIENT + "/capabilities", self.capabilities, ["GET"], name="capabilities"),
            r(CLIENT + "/createRoom", self.create_room, ["POST"], name="create_room"),
            r(CLIENT + "/join/{room}", self.join, ["POST"], name="join"),
            r(room + "/join", self.join, ["POST"], name="join"),
            r(room + "/leave", self._membership("leave", self_target=True), ["POST"],
              name="leave"),
            r(room + "/invite", self._membership("invite"), ["POST"], name="invite"),
            r(room + "/kick", self._membership("leave"), ["POST"], name="kick"),
            r(room + "/ban", self._membership("ban"), ["POST"], name="ban"),
            r(room + "/unban", self._membership("leave"), ["POST"], name="unban"),
            r(room + "/send/{type}/{txn}", self.send, ["PUT"], name="send"),
            r(room + "/state", self.get_state, ["GET"], name="state"),
            r(room + "/state/{type}", self.put_state, ["PUT"], name="put_state"),
            r(room + "/state/{type}/{key:path}", self.put_state, ["PUT"], name="put_state"),
            r(room + "/state/{type}", self.get_state_event, ["GET"], name="state_event"),
            r(room + "/state/{type}/{key:path}", self.get_state_event, ["GET"],
              name="state_event"),
            r(room + "/event/{event}", self.get_event, ["GET"], name="event"),
            r(room + "/joined_members", self.joined_members, ["GET"], name="joined_members"),
            r(room + "/members", self.members, ["GET"], name="members"),
            r(room + "/messages", self.messages, ["GET"], name="messages"),
            r(room + "/redact/{event}/{txn}", self.redact, ["PUT"], name="redact"),
            r(room + "/typing/{user}", self.typing, ["PUT"], name="typing"),
            r(room + "/receipt/{kind}/{event}", self.receipt, ["POST"], name="receipt"),
            r(room + "/read_markers", self.read_markers, ["POST"], name="read_markers"),
            r(CLIENT + "/joined_rooms", self.joined_rooms, ["GET"], name="joined_rooms"),
            r(CLIENT + "/sync", self.sync, ["GET"], name="sync", user_limit=False),
            r(CLIENT + "/directory/room/{alias}", self.put_alias, ["PUT"], name="alias"),
            r(CLIENT + "/directory/room/{alias}", self.get_alias, ["GET"], name="alias",
              auth=False),
            r(CLIENT + "/directory/room/{alias}", self.delete_alias, ["DELETE"], name="alias"),
            r(room + "/aliases", self.room_aliases, ["GET"], name="room_aliases"),
            r(CLIENT + "/directory/list/room/{room}", self.get_visibility, ["GET"],
              name="directory_list", auth=False),
            r(CLIENT + "/directory/list/room/{room}", self.put_visibility, ["PUT"],
              name="directory_list"),
            r(CLIENT + "/publicRooms", self.public_rooms, ["GET"], name="public_rooms",
              auth=False),
            r(CLIENT + "/publicRooms", self.public_rooms, ["POST"], name="public_rooms"),
            r(CLIENT + "/devices", self.devices, ["GET"], name="devices"),
            r(CLIENT + "/devices/{device}", self.device, ["GET"], name="device"),
            r(CLIENT + "/devices/{device}", self.rename_device, ["PUT"], name="device"),
            r(CLIENT + "/devices/{device}", self.delete_device, ["DELETE"], name="device"),
            r(CLIENT + "/delete_devices", self.delete_devices, ["POST"], name="delete_devices"),
            r(CLIENT + "/user/{user}/account_data/{type}", self.put_account_data, ["PUT"],
              name="account_data", canonical=False),
            r(CLIENT + "/user/{user}/account_data/{type}", self.get_account_data, ["GET"],
              name="account_data"),
            r(CLIENT + "/user/{user}/rooms/{room}/account_data/{type}", self.put_account_data,
              ["PUT"], name="room_account_data", canonical=False),
            r(CLIENT + "/user/{user}/rooms/{room}/account_data/{type}", self.get_account_data,
              ["GET"], name="room_account_data"),
            r(CLIENT + "/keys/upload", self.keys_upload, ["POST"], name="keys_upload"),
            r(CLIENT + "/keys/query", self.keys_query, ["POST"], name="keys_query"),
            r(CLIENT + "/keys/claim", self.keys_claim, ["POST"], name="keys_claim"),
            r(CLIENT + "/keys/changes", self.keys_changes, ["GET"], name="keys_changes"),
            r(CLIENT + "/sendToDevice/{type}/{txn}", self.send_to_device, ["PUT"],
              name="send_to_device"),
            r(CLIENT + "/profile/{user}", self.profile, ["GET"], name="profile", auth=False),
            r(CLIENT + "/profile/{user}/displayname", self.get_displayname, ["GET"],
              name="profile", auth=False),
            r(CLIENT + "/profile/{user}/displayname", self.set_displayname, ["PUT"],
              name="set_displayname"),
            r(CLIENT + "/user_directory/search", self.user_search, ["POST"],
              name="user_directory"),
            r(CLIENT + "/user/{user}/filter", self.put_filter, ["POST"], name="filter"),
            r(CLIENT + "/user/{user}/openid/request_token", self.openid_token, ["POST"],
              name="openid"),
            r("/_matrix/federation/v1/openid/userinfo", self.openid_userinfo, ["GET"],
              name="openid_userinfo", auth=False),
            r(CLIENT + "/user/{user}/filter/{filter}", self.get_filter, ["GET"], name="filter"),
        ]  # fmt: skip
        for prefix in ("/_matrix/media/v3", "/_matrix/client/v1/media"):
            routes += [
                r(prefix + "/config", self.media_config, ["GET"], name="media_config"),
                r(prefix + "/download/{server}/{media}", self.download, ["GET"],
                  name="download"),
                r(prefix + "/download/{server}/{media}/{filename}", self.download, ["GET"],
                  name="download"),
            ]  # fmt: skip
        routes.append(r("/_matrix/media/v3/upload", self.upload, ["POST"], name="upload",
                        body="raw"))  # fmt: skip
        return routes


def _timeline_limit(definition: Any) -> int | None:
    if not isinstance(definition, dict):
        raise bad_json("a filter must be an object")
    room = definition.get("room")
    timeline = room.get("timeline") if isinstance(room, dict) else None
    limit = timeline.get("limit") if isinstance(timeline, dict) else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


async def _not_found(request: Request, exc: Exception) -> Response:
    return matrix_error_response(MatrixError(404, "M_UNRECOGNIZED", "unrecognized request"))


async def _not_allowed(request: Request, exc: Exception) -> Response:
    if request.method == "OPTIONS":
        return Response(status_code=204, headers=_CORS)
    return matrix_error_response(MatrixError(405, "M_UNRECOGNIZED", "method not allowed"))


def build_app(
    hs: Homeserver,
    *,
    limits: ApiLimits | None = None,
    registry: CollectorRegistry | None = None,
    extra_routes: list[Route] | None = None,
    route_sets: Sequence[Callable[[ClientApi], list[Route]]] = (),
) -> Starlette:
    """The ASGI application: the client-server API (and ``extra_routes``, e.g. federation;
    ``route_sets`` make routes served through the client API's checks and limits, e.g. the
    identity service)."""
    api = ClientApi(hs, limits or ApiLimits(), registry)
    more = [route for make in route_sets for route in make(api)]
    return Starlette(
        routes=[*api.routes(), *more, *(extra_routes or [])],
        exception_handlers={404: _not_found, 405: _not_allowed},
    )
