"""The identity service's HTTP endpoints (``/_matrix/identity/v2``), served by the homeserver's
ASGI app through the client API's request handling: body limits, JSON checks, the per-address
rate limit and Matrix error bodies. See `teia.homeserver.identity` for the flow."""

from __future__ import annotations

from typing import Any

from starlette.responses import PlainTextResponse
from starlette.routing import Route

from teia.errors import MatrixError
from teia.homeserver.api import Call, ClientApi, access_token
from teia.homeserver.identity import (
    IDENTITY,
    IdentityService,
    parse_client_secret,
    parse_email,
    parse_lookup,
    parse_send_attempt,
    parse_sid,
)

__all__ = ["IdentityApi"]


def _text(call: Call, name: str) -> str:
    value = call.field(name, str)
    assert isinstance(value, str)
    return value


class IdentityApi:
    """Routes of the identity service over one `IdentityService`."""

    def __init__(self, service: IdentityService) -> None:
        self.service = service

    async def _user(self, call: Call) -> str:
        return await self.service.authenticate(access_token(call.request))

    # handlers --------------------------------------------------------------------------------

    async def status(self, call: Call) -> Any:
        return {}

    async def terms(self, call: Call) -> Any:
        return {"policies": {}}

    async def accept_terms(self, call: Call) -> Any:
        await self._user(call)
        return {}

    async def register(self, call: Call) -> Any:
        return await self.service.register_account(call.body)

    async def account(self, call: Call) -> Any:
        return {"user_id": await self._user(call)}

    async def logout(self, call: Call) -> Any:
        await self._user(call)
        token = access_token(call.request)
        assert token is not None
        await self.service.logout(token)
        return {}

    async def request_token(self, call: Call) -> Any:
        await self._user(call)
        secret = parse_client_secret(call.field("client_secret", str))
        email = parse_email(call.field("email", str))
        attempt = parse_send_attempt(call.field("send_attempt", int))
        client = call.request.client.host if call.request.client else "unknown"
        return {"sid": await self.service.request_email_token(secret, email, attempt, client)}

    async def submit_token(self, call: Call) -> Any:
        await self._user(call)
        sid = parse_sid(call.field("sid", str))
        secret = parse_client_secret(call.field("client_secret", str))
        token = _text(call, "token")
        return {"success": await self.service.submit_token(sid, secret, token[:255])}

    async def submit_token_link(self, call: Call) -> Any:
        """The link in the mail: no identity token (a browser opens it), the query carries
        the session, the secret and the token."""
        sid = parse_sid(call.query("sid"))
        secret = parse_client_secret(call.query("client_secret"))
        token = call.query("token")
        if not token:
            raise MatrixError(400, "M_MISSING_PARAMS", "missing token")
        if await self.service.submit_token(sid, secret, token[:255]):
            return PlainTextResponse("Your address is verified. You can close this page.\n")
        return PlainTextResponse("That code is wrong.\n", status_code=400)

    async def validated(self, call: Call) -> Any:
        await self._user(call)
        sid = parse_sid(call.query("sid"))
        secret = parse_client_secret(call.query("client_secret"))
        return await self.service.validated_threepid(sid, secret)

    async def bind(self, call: Call) -> Any:
        user = await self._user(call)
        sid = parse_sid(call.field("sid", str))
        secret = parse_client_secret(call.field("client_secret", str))
        return await self.service.bind(user, sid, secret, call.field("mxid", str))

    async def unbind(self, call: Call) -> Any:
        user = await self._user(call)
        await self.service.unbind(user, call.body)
        return {}

    async def hash_details(self, call: Call) -> Any:
        await self._user(call)
        return self.service.hash_details()

    async def lookup(self, call: Call) -> Any:
        await self._user(call)
        hashes = parse_lookup(call.body, self.service.pepper)
        return {"mappings": await self.service.lookup(hashes)}

    async def pubkey(self, call: Call) -> Any:
        key = self.service.hs.signing_key
        if call.param("key") != key.key_id:
            raise MatrixError(404, "M_NOT_FOUND", "no such key")
        return {"public_key": key.public_b64}

    async def pubkey_valid(self, call: Call) -> Any:
        return {"valid": call.query("public_key") == self.service.hs.signing_key.public_b64}

    async def ephemeral_valid(self, call: Call) -> Any:
        return {"valid": False}  # no ephemeral keys: third-party invites are not served

    def routes(self, api: ClientApi) -> list[Route]:
        """The routes, made by ``api`` (its checks, limits and error handling)."""
        r = api.route
        v = IDENTITY
        mail = v + "/validate/email"
        return [
            r(v, self.status, ["GET"], name="id_status", auth=False),
            r(v + "/terms", self.terms, ["GET"], name="id_terms", auth=False),
            r(v + "/terms", self.accept_terms, ["POST"], name="id_terms", auth=False),
            r(v + "/account/register", self.register, ["POST"], name="id_register", auth=False),
            r(v + "/account", self.account, ["GET"], name="id_account", auth=False),
            r(v + "/account/logout", self.logout, ["POST"], name="id_logout", auth=False),
            r(mail + "/requestToken", self.request_token, ["POST"], name="id_request_token",
              auth=False),
            r(mail + "/submitToken", self.submit_token, ["POST"], name="id_submit_token",
              auth=False),
            r(mail + "/submitToken", self.submit_token_link, ["GET"], name="id_submit_token",
              auth=False),
            r(v + "/3pid/getValidated3pid", self.validated, ["GET"], name="id_validated",
              auth=False),
            r(v + "/3pid/bind", self.bind, ["POST"], name="id_bind", auth=False),
            r(v + "/3pid/unbind", self.unbind, ["POST"], name="id_unbind", auth=False),
            r(v + "/hash_details", self.hash_details, ["GET"], name="id_hash_details",
              auth=False),
            r(v + "/lookup", self.lookup, ["POST"], name="id_lookup", auth=False),
            r(v + "/pubkey/isvalid", self.pubkey_valid, ["GET"], name="id_pubkey", auth=False),
            r(v + "/pubkey/ephemeral/isvalid", self.ephemeral_valid, ["GET"], name="id_pubkey",
              auth=False),
            r(v + "/pubkey/{key}", self.pubkey, ["GET"], name="id_pubkey", auth=False),
        ]  # fmt: skip
