"""The identity service through real HTTP on loopback, on both backends: OpenID token →
identity token, a mailed token (directory delivery, then a real SMTP server on loopback, with
and without STARTTLS), validation, binding to one's own user only, hashed lookup, unbinding;
wrong, expired, reused and brute-forced tokens, rate limits, malformed input."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from teia.homeserver.events import b64decode, b64encode, signed_bytes, verify_signature
from teia.homeserver.keys import VerifyKey

from .conftest import ServerHandle, base_config, serve_in_thread
from .test_api import Http

pytestmark = pytest.mark.anyio
TIMEOUT = 60
C = "/_matrix/client/v3"
ID = "/_matrix/identity/v2"
_TOKEN = re.compile(r"Your verification code: (\S+)")


def identity_config(tmp_path: Path, database: str, **overrides: Any) -> Any:
    return base_config(
        tmp_path,
        database,
        identity_service=True,
        identity_delivery="directory",
        identity_mail_dir=str(tmp_path / "mail"),
        **overrides,
    )


@pytest.fixture
def id_server(tmp_path: Path, database_for: Callable[[], str]) -> Iterator[ServerHandle]:
    with serve_in_thread(identity_config(tmp_path, database_for())) as handle:
        yield handle


@pytest.fixture
async def http(id_server: ServerHandle) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, id_server.url)


def sha256_lookup(address: str, pepper: str) -> str:
    return b64encode(hashlib.sha256(f"{address} email {pepper}".encode()).digest(), urlsafe=True)


async def identity_token(http: Http, name: str) -> tuple[str, str]:
    """Register ``name`` on the homeserver; trade an OpenID token for an identity token."""
    user, token = await http.register(name)
    status, openid = await http.call(
        "POST", f"{C}/user/{user}/openid/request_token", token=token, json={}
    )
    assert status == 200, openid
    assert openid["token_type"] == "Bearer"
    assert openid["expires_in"] > 0
    status, body = await http.call("POST", ID + "/account/register", json=openid)
    assert status == 200, body
    status, account = await http.call("GET", ID + "/account", token=body["token"])
    assert (status, account) == (200, {"user_id": user})
    return user, body["token"]


def mails(directory: Path) -> list[EmailMessage]:
    found = []
    for path in sorted(directory.glob("*.eml")) if directory.exists() else []:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        message = message_from_bytes(path.read_bytes(), policy=policy.default)
        assert isinstance(message, EmailMessage)
        found.append(message)
    return found


def token_in(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    match = _TOKEN.search(body.get_content())
    assert match, "no token in the mail"
    return match.group(1)


async def request_token(
    http: Http, token: str, secret: str, email: str, attempt: int = 1
) -> tuple[int, Any]:
    return await http.call(
        "POST",
        ID + "/validate/email/requestToken",
        token=token,
        json={"client_secret": secret, "email": email, "send_attempt": attempt},
    )


async def submit(http: Http, token: str, sid: str, secret: str, code: str) -> tuple[int, Any]:
    return await http.call(
        "POST",
        ID + "/validate/email/submitToken",
        token=token,
        json={"sid": sid, "client_secret": secret, "token": code},
    )


async def test_verify_bind_lookup_unbind(
    http: Http, id_server: ServerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mail_dir = tmp_path / "mail"
    with anyio.fail_after(TIMEOUT):
        alice, alice_id = await identity_token(http, "alice")
        bob, bob_id = await identity_token(http, "bob")
        status, body = await http.call("GET", ID)
        assert (status, body) == (200, {})
        status, terms = await http.call("GET", ID + "/terms")
        assert (status, terms) == (200, {"policies": {}})

        status, body = await request_token(http, alice_id, "secret1", "Alice@Example.ORG")
        assert status == 200, body
        sid = body["sid"]
        [mail] = mails(mail_dir)
        assert mail["To"] == "alice@example.org"
        assert mail["From"] == "noreply@localhost"
        code = token_in(mail)

        # A repeated request (same send_attempt) is the same session, and no new mail.
        status, again = await request_token(http, alice_id, "secret1", "alice@example.org")
        assert (status, again) == (200, {"sid": sid})
        assert len(mails(mail_dir)) == 1

        # Not validated yet: no binding.
        status, body = await http.call(
            "POST", ID + "/3pid/bind", token=alice_id,
            json={"sid": sid, "client_secret": "secret1", "mxid": alice},
        )  # fmt: skip
        assert (status, body["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")

        # A wrong token is a spent attempt; the right one validates; it is single use.
        assert await submit(http, alice_id, sid, "secret1", "wrong") == (200, {"success": False})
        status, body = await submit(http, alice_id, sid, "wrong-secret", code)
        assert (status, body["errcode"]) == (400, "M_NO_VALID_SESSION")
        assert await submit(http, alice_id, sid, "secret1", code) == (200, {"success": True})
        status, body = await submit(http, alice_id, sid, "secret1", code)
        assert (status, body["errcode"]) == (400, "M_NO_VALID_SESSION")

        status, body = await http.call(
            "GET", f"{ID}/3pid/getValidated3pid?sid={sid}&client_secret=secret1", token=alice_id
        )
        assert status == 200, body
        assert (body["medium"], body["address"]) == ("email", "alice@example.org")
        assert isinstance(body["validated_at"], int)

        # Binding to someone else's user, or as someone else, is refused.
        bind = {"sid": sid, "client_secret": "secret1", "mxid": bob}
        status, body = await http.call("POST", ID + "/3pid/bind", token=alice_id, json=bind)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        bind["mxid"] = alice
        status, body = await http.call("POST", ID + "/3pid/bind", token=bob_id, json=bind)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")

        status, association = await http.call("POST", ID + "/3pid/bind", token=alice_id, json=bind)
        assert status == 200, association
        assert (association["mxid"], association["address"]) == (alice, "alice@example.org")
        key_id = next(iter(association["signatures"]["localhost"]))
        status, key = await http.call("GET", f"{ID}/pubkey/{key_id}")
        assert status == 200
        assert verify_signature(
            association, "localhost", key_id, VerifyKey.from_b64(key["public_key"])
        )
        # and by an independent implementation (the homeserver signs with teia._native)
        Ed25519PublicKey.from_public_bytes(b64decode(key["public_key"])).verify(
            b64decode(association["signatures"]["localhost"][key_id]), signed_bytes(association)
        )
        status, valid = await http.call(
            "GET", f"{ID}/pubkey/isvalid?public_key={quote(key['public_key'], safe='')}"
        )
        assert valid == {"valid": True}
        # The session is used up by the binding.
        status, body = await http.call("POST", ID + "/3pid/bind", token=alice_id, json=bind)
        assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")

        # Lookup by hash.
        status, details = await http.call("GET", ID + "/hash_details", token=bob_id)
        assert (status, details["algorithms"]) == (200, ["sha256"])
        pepper = details["lookup_pepper"]
        wanted = sha256_lookup("alice@example.org", pepper)
        nobody = sha256_lookup("nobody@example.org", pepper)
        lookup = {"algorithm": "sha256", "pepper": pepper, "addresses": [wanted, nobody]}
        status, body = await http.call("POST", ID + "/lookup", token=bob_id, json=lookup)
        assert (status, body) == (200, {"mappings": {wanted: alice}})
        status, body = await http.call(
            "POST", ID + "/lookup", token=bob_id, json={**lookup, "pepper": "stale"}
        )
        assert (status, body["errcode"], body["lookup_pepper"]) == (400, "M_INVALID_PEPPER", pepper)
        status, body = await http.call("POST", ID + "/lookup", json=lookup)
        assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")

        # Only the owner unbinds.
        unbind = {"mxid": alice, "threepid": {"medium": "email", "address": "alice@example.org"}}
        status, body = await http.call("POST", ID + "/3pid/unbind", token=bob_id, json=unbind)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        status, body = await http.call("POST", ID + "/3pid/unbind", token=alice_id, json=unbind)
        assert (status, body) == (200, {})
        status, body = await http.call("POST", ID + "/lookup", token=bob_id, json=lookup)
        assert (status, body) == (200, {"mappings": {}})

        # Logging out of the identity service ends the token.
        status, _ = await http.call("POST", ID + "/account/logout", token=bob_id, json={})
        assert status == 200
        status, body = await http.call("GET", ID + "/account", token=bob_id)
        assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")

    logged = [str(v) for r in caplog.records for v in (r.getMessage(), *r.__dict__.values())]
    assert any("verification mail sent" in line for line in logged)
    for line in logged:
        assert code not in line
        assert "alice@example.org" not in line.lower()


async def test_expired_and_brute_forced_tokens(
    http: Http, id_server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = id_server.identity
    assert identity is not None
    with anyio.fail_after(TIMEOUT):
        _, token = await identity_token(http, "carol")
        # Attempt-limited: after max_attempts wrong tokens the right one is refused.
        status, body = await request_token(http, token, "s1", "carol@example.org")
        sid = body["sid"]
        code = token_in(mails(tmp_path / "mail")[-1])
        for _ in range(id_server.config.identity_max_attempts):
            assert await submit(http, token, sid, "s1", "guess") == (200, {"success": False})
        status, body = await submit(http, token, sid, "s1", code)
        assert (status, body["errcode"]) == (400, "M_NO_VALID_SESSION")

        # A new send_attempt mails a new token; past its lifetime it is refused.
        before = set((tmp_path / "mail").glob("*.eml"))
        status, body = await request_token(http, token, "s1", "carol@example.org", attempt=2)
        assert body["sid"] == sid
        [newest] = set((tmp_path / "mail").glob("*.eml")) - before
        code = token_in(mails_from_bytes(newest.read_bytes()))
        later = identity.now_ms() + identity.settings.token_lifetime * 1000 + 1
        monkeypatch.setattr(identity, "now_ms", lambda: later)
        status, body = await submit(http, token, sid, "s1", code)
        assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")
        status, body = await submit(http, token, sid, "s1", code)
        assert (status, body["errcode"]) == (400, "M_NO_VALID_SESSION")


async def test_mail_rate_limits(tmp_path: Path) -> None:
    config = identity_config(tmp_path, "sqlite", identity_mails_per_hour=2.0,
                             identity_ip_mails_per_hour=4.0)  # fmt: skip
    with serve_in_thread(config) as server, anyio.fail_after(TIMEOUT):
        async with aiohttp.ClientSession() as session:
            http = Http(session, server.url)
            _, token = await identity_token(http, "dave")
            for attempt in (1, 2):
                status, _ = await request_token(http, token, "s", "d@example.org", attempt)
                assert status == 200
            status, body = await request_token(http, token, "s", "d@example.org", 3)
            assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
            assert body["retry_after_ms"] > 0
            # The refused request still counted against the client address (4 per hour).
            status, _ = await request_token(http, token, "s", "e@example.org")
            assert status == 200
            status, body = await request_token(http, token, "s", "f@example.org")
            assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
            assert len(mails(tmp_path / "mail")) == 3


async def test_malformed_input_gets_matrix_errors(
    http: Http, id_server: ServerHandle, tmp_path: Path
) -> None:
    with anyio.fail_after(TIMEOUT):
        user, hs_token = await http.register("erin")
        # OpenID tokens: only for oneself; only this server's; unknown ones refused.
        status, body = await http.call(
            "POST", f"{C}/user/@other:localhost/openid/request_token", token=hs_token, json={}
        )
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        bogus = {"access_token": "nope", "token_type": "Bearer", "matrix_server_name": "localhost",
                 "expires_in": 3600}  # fmt: skip
        status, body = await http.call("POST", ID + "/account/register", json=bogus)
        assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        status, body = await http.call(
            "POST", ID + "/account/register", json={**bogus, "matrix_server_name": "elsewhere"}
        )
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        status, body = await http.call("POST", ID + "/account/register", json={})
        assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")
        # The homeserver's own access token is not an identity token.
        status, body = await request_token(http, hs_token, "s", "erin@example.org")
        assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")

        _, token = await identity_token(http, "erin2")
        bad_requests: list[tuple[dict[str, Any], str]] = [
            ({"client_secret": "s", "email": "not an address", "send_attempt": 1},
             "M_INVALID_EMAIL"),
            ({"client_secret": "s", "email": "a@b.c\r\nBcc: x@y.z", "send_attempt": 1},
             "M_INVALID_EMAIL"),
            ({"client_secret": "bad secret!", "email": "a@b.org", "send_attempt": 1},
             "M_INVALID_PARAM"),
            ({"client_secret": "s", "email": "a@b.org", "send_attempt": -1}, "M_INVALID_PARAM"),
            ({"client_secret": "s", "email": "a@b.org", "send_attempt": "1"}, "M_BAD_JSON"),
            ({"client_secret": "s", "email": "a@b.org"}, "M_MISSING_PARAM"),
        ]  # fmt: skip
        for request, errcode in bad_requests:
            status, body = await http.call(
                "POST", ID + "/validate/email/requestToken", token=token, json=request
            )
            assert (status, body["errcode"]) == (400, errcode), request
        status, body = await http.call(
            "POST", ID + "/validate/email/requestToken", token=token, data=b"{nope",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert (status, body["errcode"]) == (400, "M_NOT_JSON")
        assert mails(tmp_path / "mail") == []  # nothing was mailed

        status, body = await submit(http, token, "no-such-sid", "s", "x")
        assert (status, body["errcode"]) == (400, "M_NO_VALID_SESSION")
        status, body = await submit(http, token, "bad sid", "s", "x")
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
        status, body = await http.call(
            "POST", ID + "/3pid/bind", token=token,
            json={"sid": "x", "client_secret": "s", "mxid": "not-a-user"},
        )  # fmt: skip
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")

        status, details = await http.call("GET", ID + "/hash_details", token=token)
        pepper = details["lookup_pepper"]
        for lookup, errcode in [
            ({"algorithm": "none", "pepper": pepper, "addresses": []}, "M_INVALID_PARAM"),
            ({"algorithm": "sha256", "pepper": pepper, "addresses": ["a@b.org email"]},
             "M_INVALID_PARAM"),
            ({"algorithm": "sha256", "pepper": pepper, "addresses": "x"}, "M_INVALID_PARAM"),
            ({"algorithm": "sha256", "pepper": pepper}, "M_MISSING_PARAMS"),
        ]:  # fmt: skip
            status, body = await http.call("POST", ID + "/lookup", token=token, json=lookup)
            assert (status, body["errcode"]) == (400, errcode), lookup
        status, body = await http.call("GET", ID + "/pubkey/ed25519:nope")
        assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
        # The server keeps serving.
        status, body = await http.call("GET", C + "/account/whoami", token=hs_token)
        assert (status, body["user_id"]) == (200, user)


async def test_link_in_the_mail_validates(tmp_path: Path) -> None:
    config = identity_config(tmp_path, "sqlite", identity_public_url="http://127.0.0.1:1/")
    with serve_in_thread(config) as server, anyio.fail_after(TIMEOUT):
        async with aiohttp.ClientSession() as session:
            http = Http(session, server.url)
            _, token = await identity_token(http, "fay")
            status, body = await request_token(http, token, "s", "fay@example.org")
            [mail] = mails(tmp_path / "mail")
            text = mail.get_body(("plain",))
            assert text is not None
            link = re.search(r"http://127\.0\.0\.1:1(/\S+)", text.get_content())
            assert link is not None
            # Opened as a browser would: no identity token, against the real server.
            async with session.get(server.url + link.group(1)) as response:
                assert response.status == 200
                assert "verified" in await response.text()
            status, body = await http.call(
                "GET",
                f"{ID}/3pid/getValidated3pid?sid={body['sid']}&client_secret=s",
                token=token,
            )
            assert (status, body["address"]) == (200, "fay@example.org")


# A real SMTP server on loopback ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Inbox:
    """An aiosmtpd handler keeping what it receives (it runs in aiosmtpd's thread; the mail is
    kept before the server answers DATA, so before the sender's request returns)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


@pytest.mark.parametrize("starttls", [False, True], ids=["plain", "starttls"])
async def test_smtp_delivery_to_a_real_server(
    tmp_path: Path, database_for: Callable[[], str], starttls: bool
) -> None:
    from aiosmtpd.controller import Controller

    inbox = _Inbox()
    port = _free_port()
    options: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    if starttls:
        cert, key = _self_signed(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        options = {"tls_context": context, "require_starttls": True}
        overrides = {"smtp_starttls": True, "smtp_ca_file": str(cert)}
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        config = base_config(
            tmp_path, database_for(), identity_service=True, identity_delivery="smtp",
            smtp_host="127.0.0.1", smtp_port=port, identity_mail_from="id@hs.test", **overrides,
        )  # fmt: skip
        with serve_in_thread(config) as server, anyio.fail_after(TIMEOUT):
            async with aiohttp.ClientSession() as session:
                http = Http(session, server.url)
                user, token = await identity_token(http, "gus")
                status, body = await request_token(http, token, "s", "Gus@Example.org")
                assert status == 200, body
                with inbox.lock:
                    [(sender, recipients, raw)] = inbox.messages
                assert (sender, recipients) == ("id@hs.test", ["gus@example.org"])
                code = token_in(mails_from_bytes(raw))
                assert await submit(http, token, body["sid"], "s", code) == (
                    200, {"success": True},
                )  # fmt: skip
                status, _ = await http.call(
                    "POST", ID + "/3pid/bind", token=token,
                    json={"sid": body["sid"], "client_secret": "s", "mxid": user},
                )  # fmt: skip
                assert status == 200
    finally:
        controller.stop()


def mails_from_bytes(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def test_smtp_server_down_is_a_send_error(tmp_path: Path) -> None:
    config = base_config(tmp_path, "sqlite", identity_service=True, identity_delivery="smtp",
                         smtp_host="127.0.0.1", smtp_port=_free_port())  # fmt: skip
    with serve_in_thread(config) as server, anyio.fail_after(TIMEOUT):
        async with aiohttp.ClientSession() as session:
            http = Http(session, server.url)
            _, token = await identity_token(http, "hal")
            status, body = await request_token(http, token, "s", "hal@example.org")
            assert (status, body["errcode"]) == (500, "M_EMAIL_SEND_ERROR")
            # Nothing is left behind: the same request can be made again.
            status, body = await request_token(http, token, "s", "hal@example.org")
            assert (status, body["errcode"]) == (500, "M_EMAIL_SEND_ERROR")
