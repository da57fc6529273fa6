"""The identity service: a verified e-mail address → a user ID (Matrix Identity Service API
v2, the subset a client needs to make its address discoverable and to look others up).

The flow, as Matrix clients run it against an identity server:

1. The client asks its homeserver for an OpenID token
   (``POST /_matrix/client/v3/user/{userId}/openid/request_token``) and trades it for an
   identity-service token (``POST /_matrix/identity/v2/account/register``). Every call but
   the status, the terms and the public keys carries that token.
2. ``POST /validate/email/requestToken`` (``client_secret``, ``email``, ``send_attempt``) mails
   a random token to the address and answers a session ID (``sid``).
3. ``POST /validate/email/submitToken`` (``sid``, ``client_secret``, ``token``) proves the
   address. The token is single use, expires (``token_lifetime``) and allows
   ``max_attempts`` wrong guesses before the session is spent.
4. ``POST /3pid/bind`` (``sid``, ``client_secret``, ``mxid``) binds the proven address to the
   caller's own user ID only; the answer is the association signed with the server's key.
5. ``GET /hash_details`` + ``POST /lookup``: anyone authenticated asks for
   ``sha256("{address} email {pepper}")`` hashes (unpadded URL-safe base64) and learns the user
   IDs bound to them; plain-text (``none``) lookups are not offered.

It lives in the homeserver's process and database (SQLite or PostgreSQL), and serves the users
of that homeserver: an OpenID token of another server is refused. Tokens are kept only as
SHA-256 hashes; logs show a session ID and a masked address, never a token or a full address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlencode

from prometheus_client import CollectorRegistry, Counter

from teia.errors import MatrixError
from teia.homeserver.events import b64encode, sign_json
from teia.homeserver.mail import MailDelivery, MailDeliveryError, mask_address
from teia.homeserver.ratelimit import RateLimiter
from teia.homeserver.server import Homeserver, token_hash, valid_user_id
from teia.homeserver.storage import Tx
from teia.service.logs import fields

__all__ = [
    "IDENTITY",
    "MAX_LOOKUP_ADDRESSES",
    "IdentityService",
    "IdentitySettings",
    "lookup_hash",
    "parse_client_secret",
    "parse_email",
    "parse_lookup",
    "parse_send_attempt",
    "parse_sid",
]

log = logging.getLogger("teia.homeserver.identity")

IDENTITY = "/_matrix/identity/v2"
MEDIUM = "email"
MAX_LOOKUP_ADDRESSES = 1000
_SECRET = re.compile(r"[0-9a-zA-Z.=_\-]{1,255}")
_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~.")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
_HASH = re.compile(r"[A-Za-z0-9_\-]{43}")
_MAX_SEND_ATTEMPT = 2**53 - 1


# parsers -----------------------------------------------------------------------------------


def _invalid_email() -> MatrixError:
    return MatrixError(400, "M_INVALID_EMAIL", "not an e-mail address this server can verify")


def parse_email(value: Any) -> str:
    """An e-mail address in the form it is stored, hashed and compared: ASCII, lowercased
    (as the identity service spec asks), a dot-atom local part and a host name of
    letter-digit-hyphen labels. Anything else is ``M_INVALID_EMAIL``."""
    if not isinstance(value, str) or not 3 <= len(value) <= 254:
        raise _invalid_email()
    local, at, domain = value.rpartition("@")
    if (
        not at
        or not 1 <= len(local) <= 64
        or not all(c in _LOCAL_CHARS for c in local)
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
    ):
        raise _invalid_email()
    domain = domain.lower()
    if not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        raise _invalid_email()
    return f"{local.lower()}@{domain}"


def parse_client_secret(value: Any) -> str:
    """A client secret as the spec allows: 1 to 255 of ``[0-9a-zA-Z.=_-]``."""
    if not isinstance(value, str) or not _SECRET.fullmatch(value):
        raise MatrixError(400, "M_INVALID_PARAM", "client_secret must be 1-255 of [0-9a-zA-Z.=_-]")
    return value


def parse_sid(value: Any) -> str:
    """A session ID: the same alphabet as client secrets."""
    if not isinstance(value, str) or not _SECRET.fullmatch(value):
        raise MatrixError(400, "M_INVALID_PARAM", "sid must be 1-255 of [0-9a-zA-Z.=_-]")
    return value


def parse_send_attempt(value: Any) -> int:
    """A non-negative integer (JSON number without fraction; strings of digits from a query)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 17:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_SEND_ATTEMPT:
        raise MatrixError(400, "M_INVALID_PARAM", "send_attempt must be a non-negative integer")
    return value


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    """The v2 lookup hash: SHA-256 of ``"{address} {medium} {pepper}"``, unpadded URL-safe
    base64."""
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return b64encode(digest, urlsafe=True)


def parse_lookup(body: Any, pepper: str) -> list[str]:
    """The hashes of a ``POST /lookup`` body, checked: the ``sha256`` algorithm, the current
    pepper (else ``M_INVALID_PEPPER`` with the right one), and at most
    `MAX_LOOKUP_ADDRESSES` well-formed hashes (duplicates dropped, order kept)."""
    if not isinstance(body, dict):
        raise MatrixError(400, "M_BAD_JSON", "the body must be a JSON object")
    for name in ("algorithm", "pepper", "addresses"):
        if name not in body:
            raise MatrixError(400, "M_MISSING_PARAMS", f"missing {name}")
    if body["algorithm"] != "sha256":
        raise MatrixError(400, "M_INVALID_PARAM", "only the sha256 algorithm is supported")
    if not isinstance(body["pepper"], str) or not hmac.compare_digest(body["pepper"], pepper):
        raise MatrixError(400, "M_INVALID_PEPPER", "wrong pepper", algorithm="sha256",
                          lookup_pepper=pepper)  # fmt: skip
    addresses = body["addresses"]
    if not isinstance(addresses, list) or len(addresses) > MAX_LOOKUP_ADDRESSES:
        raise MatrixError(
            400, "M_INVALID_PARAM", f"addresses must be a list of at most {MAX_LOOKUP_ADDRESSES}"
        )
    if not all(isinstance(a, str) and _HASH.fullmatch(a) for a in addresses):
        raise MatrixError(400, "M_INVALID_PARAM", "addresses must be sha256 lookup hashes")
    return list(dict.fromkeys(addresses))


# the service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentitySettings:
    """The identity service's policy (the homeserver service fills it from its config)."""

    mail_from: str
    public_url: str = ""
    """Base URL for the link in the mails (``GET …/submitToken``); none when empty."""
    token_lifetime: int = 3600
    """Seconds a mailed token stays valid, and a proven address stays bindable."""
    max_attempts: int = 5
    """Wrong tokens a session takes before it is spent."""
    mails_per_hour_per_address: float = 5.0
    mails_per_hour_per_ip: float = 30.0


_SESSION_COLUMNS = "sid, address, send_attempt, token_hash, expires_ts, attempts_left, validated_ts"


@dataclass(frozen=True)
class _Session:
    sid: str
    address: str
    send_attempt: int
    token_hash: str | None
    expires_ts: int
    attempts_left: int
    validated_ts: int | None


def _session(row: tuple[Any, ...] | None) -> _Session | None:
    if row is None:
        return None
    return _Session(str(row[0]), str(row[1]), int(row[2]), row[3], int(row[4]), int(row[5]),
                    None if row[6] is None else int(row[6]))  # fmt: skip


def _secret_hash(client_secret: str) -> str:
    return hashlib.sha256(client_secret.encode("ascii")).hexdigest()


def _no_session() -> MatrixError:
    return MatrixError(400, "M_NO_VALID_SESSION", "no such session, or its token was used up")


def _expired() -> MatrixError:
    return MatrixError(400, "M_SESSION_EXPIRED", "the session expired: request a new token")


class IdentityService:
    """The identity service's logic over the homeserver's database, and its mail delivery."""

    def __init__(
        self,
        hs: Homeserver,
        delivery: MailDelivery,
        settings: IdentitySettings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.hs = hs
        self.db = hs.store.db
        self.delivery = delivery
        self.settings = settings
        self.pepper = ""
        hourly = 3600.0
        self._address_limiter = RateLimiter(
            settings.mails_per_hour_per_address / hourly, settings.mails_per_hour_per_address
        )
        self._ip_limiter = RateLimiter(
            settings.mails_per_hour_per_ip / hourly, settings.mails_per_hour_per_ip
        )
        self._mails = Counter(
            "teia_homeserver_identity_mails_total",
            "verification mails, by delivery and outcome",
            ["delivery", "outcome"],
            registry=registry,
        )
        self._validations = Counter(
            "teia_homeserver_identity_validations_total",
            "token submissions, by outcome",
            ["outcome"],
            registry=registry,
        )
        self._bindings = Counter(
            "teia_homeserver_identity_bindings_total",
            "address bindings made and removed",
            ["action"],
            registry=registry,
        )

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    async def start(self) -> None:
        """Read the lookup pepper, or make one (kept for good: stored hashes depend on it)."""

        def fn(tx: Tx) -> str:
            tx.run(
                "INSERT INTO identity_settings (name, value) VALUES ('lookup_pepper', ?)"
                " ON CONFLICT (name) DO NOTHING",
                (secrets.token_urlsafe(24),),
            )
            row = tx.one("SELECT value FROM identity_settings WHERE name = 'lookup_pepper'")
            assert row is not None
            return str(row[0])

        self.pepper = await self.db.run(fn, write=True)

    # accounts --------------------------------------------------------------------------------

    async def register_account(self, body: dict[str, Any]) -> dict[str, Any]:
        """Trade an OpenID token of this homeserver for an identity-service token."""
        token = body.get("access_token")
        server = body.get("matrix_server_name")
        if not isinstance(token, str) or not isinstance(server, str):
            raise MatrixError(400, "M_MISSING_PARAMS", "an OpenID token is required "
                              "(access_token, matrix_server_name)")  # fmt: skip
        if server != self.hs.server_name:
            served = self.hs.server_name
            raise MatrixError(403, "M_FORBIDDEN", f"this identity service serves users of {served}")
        user_id = await self.hs.openid_userinfo(token)
        own = "ist_" + secrets.token_urlsafe(32)
        await self.db.run(
            lambda tx: tx.run(
                "INSERT INTO identity_accounts (token_hash, user_id, created_ts) VALUES (?, ?, ?)",
                (token_hash(own), user_id, self.now_ms()),
            ),
            write=True,
        )
        return {"token": own}

    async def authenticate(self, token: str | None) -> str:
        """The user an identity-service token belongs to (401 ``M_UNAUTHORIZED`` if none)."""
        if token:
            row = await self.db.run(
                lambda tx: tx.one(
                    "SELECT user_id FROM identity_accounts WHERE token_hash = ?",
                    (token_hash(token),),
                )
            )
            if row is not None:
                return str(row[0])
        raise MatrixError(401, "M_UNAUTHORIZED", "an identity service token is required "
                          "(POST /_matrix/identity/v2/account/register)")  # fmt: skip

    async def logout(self, token: str) -> None:
        await self.db.run(
            lambda tx: tx.run(
                "DELETE FROM identity_accounts WHERE token_hash = ?", (token_hash(token),)
            ),
            write=True,
        )

    # validation ------------------------------------------------------------------------------

    def _rate(self, limiter: RateLimiter, key: str) -> None:
        wait = limiter.take(key, time.monotonic())
        if wait > 0:
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "too many verification mails",
                              retry_after_ms=int(wait * 1000) + 1)  # fmt: skip

    async def request_email_token(
        self, client_secret: str, email: str, send_attempt: int, client_ip: str
    ) -> str:
        """Mail a token to ``email`` and answer the session ID. A repeated request (same
        secret and address, ``send_attempt`` not above the last) answers the same session
        without mailing again, as the spec asks."""
        secret = _secret_hash(client_secret)
        now = self.now_ms()
        row = await self.db.run(
            lambda tx: tx.one(
                f"SELECT {_SESSION_COLUMNS} FROM identity_sessions"  # noqa: S608
                " WHERE secret_hash = ? AND medium = ? AND address = ?",
                (secret, MEDIUM, email),
            )
        )
        existing = _session(row)
        if (
            existing is not None
            and existing.expires_ts > now
            and send_attempt <= existing.send_attempt
        ):
            return existing.sid
        self._rate(self._ip_limiter, client_ip)
        self._rate(self._address_limiter, hashlib.sha256(email.encode()).hexdigest())
        token = secrets.token_urlsafe(18)
        expires = now + self.settings.token_lifetime * 1000

        def store(tx: Tx) -> str:
            tx.run("DELETE FROM identity_sessions WHERE expires_ts <= ?", (now,))
            row = tx.one(
                "INSERT INTO identity_sessions (sid, secret_hash, medium, address, send_attempt,"
                " token_hash, expires_ts, attempts_left, validated_ts)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)"
                " ON CONFLICT (secret_hash, medium, address) DO UPDATE SET"
                " send_attempt = excluded.send_attempt, token_hash = excluded.token_hash,"
                " expires_ts = excluded.expires_ts, attempts_left = excluded.attempts_left,"
                " validated_ts = NULL RETURNING sid",
                (secrets.token_urlsafe(16), secret, MEDIUM, email, send_attempt,
                 token_hash(token), expires, self.settings.max_attempts),
            )  # fmt: skip
            assert row is not None
            return str(row[0])

        sid = await self.db.run(store, write=True)
        message = self._message(email, sid, client_secret, token)
        try:
            await self.delivery.deliver(message)
        except MailDeliveryError as exc:
            self._mails.labels(self.delivery.name, "failed").inc()
            log.warning("verification mail not delivered",
                        extra=fields(sid=sid, to=mask_address(email), reason=str(exc)))  # fmt: skip
            await self.db.run(
                lambda tx: tx.run("DELETE FROM identity_sessions WHERE sid = ?", (sid,)),
                write=True,
            )
            raise MatrixError(500, "M_EMAIL_SEND_ERROR", "the verification mail could not be "
                              "sent; try again later") from None  # fmt: skip
        self._mails.labels(self.delivery.name, "sent").inc()
        log.info("verification mail sent", extra=fields(sid=sid, to=mask_address(email)))
        return sid

    def _message(self, email: str, sid: str, client_secret: str, token: str) -> EmailMessage:
        minutes = max(1, self.settings.token_lifetime // 60)
        server = self.hs.server_name
        lines = [
            f"Someone, probably you, asked to link this address to an account on {server}.",
            "",
            f"Your verification code: {token}",
            "",
            f"It is valid for {minutes} minutes, once.",
        ]
        if self.settings.public_url:
            query = urlencode({"sid": sid, "client_secret": client_secret, "token": token})
            base = self.settings.public_url.rstrip("/")
            lines += ["", "Or open:", f"{base}{IDENTITY}/validate/email/submitToken?{query}"]
        lines += ["", "If you did not ask for it, ignore this mail: nothing is linked."]
        message = EmailMessage()
        message["From"] = self.settings.mail_from
        message["To"] = email
        message["Subject"] = f"Your verification code for {server}"
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = make_msgid(domain=self.settings.mail_from.rpartition("@")[2]
                                           .strip(">") or "localhost")  # fmt: skip
        message["Auto-Submitted"] = "auto-generated"
        message.set_content("\n".join(lines) + "\n")
        return message

    async def submit_token(self, sid: str, client_secret: str, token: str) -> bool:
        """Check a mailed token: True proves the address; False is a wrong token (a spent
        attempt). Unknown, used-up and expired sessions are Matrix errors."""
        secret = _secret_hash(client_secret)
        offered = token_hash(token)
        now = self.now_ms()

        def fn(tx: Tx) -> str:
            session = _session(
                tx.one(
                    f"SELECT {_SESSION_COLUMNS} FROM identity_sessions"  # noqa: S608
                    " WHERE sid = ? AND secret_hash = ?",
                    (sid, secret),
                )
            )
            if session is None or session.token_hash is None:
                return "unknown"
            if session.expires_ts <= now:
                tx.run("DELETE FROM identity_sessions WHERE sid = ?", (sid,))
                return "expired"
            if hmac.compare_digest(offered, session.token_hash):
                tx.run(
                    "UPDATE identity_sessions SET token_hash = NULL, validated_ts = ?,"
                    " expires_ts = ? WHERE sid = ?",
                    (now, now + self.settings.token_lifetime * 1000, sid),
                )
                return "validated"
            left = session.attempts_left - 1
            tx.run(
                "UPDATE identity_sessions SET attempts_left = ?, token_hash = ? WHERE sid = ?",
                (left, session.token_hash if left > 0 else None, sid),
            )
            return "wrong"

        outcome = await self.db.run(fn, write=True)
        self._validations.labels(outcome).inc()
        if outcome == "unknown":
            raise _no_session()
        if outcome == "expired":
            raise _expired()
        if outcome == "validated":
            log.info("address validated", extra=fields(sid=sid))
        return outcome == "validated"

    def _proven(self, tx: Tx, sid: str, client_secret: str, now: int) -> _Session | str:
        session = _session(
            tx.one(
                f"SELECT {_SESSION_COLUMNS} FROM identity_sessions"  # noqa: S608
                " WHERE sid = ? AND secret_hash = ?",
                (sid, _secret_hash(client_secret)),
            )
        )
        if session is None:
            return "unknown"
        if session.expires_ts <= now:
            return "expired"
        if session.validated_ts is None:
            return "not_validated"
        return session

    @staticmethod
    def _refusal(outcome: str) -> MatrixError:
        if outcome == "expired":
            return _expired()
        if outcome == "not_validated":
            return MatrixError(400, "M_SESSION_NOT_VALIDATED", "submit the mailed token first")
        return MatrixError(404, "M_NO_VALID_SESSION", "no such session")

    async def validated_threepid(self, sid: str, client_secret: str) -> dict[str, Any]:
        """``GET /3pid/getValidated3pid``: the proven address of a session."""
        found = await self.db.run(lambda tx: self._proven(tx, sid, client_secret, self.now_ms()))
        if not isinstance(found, _Session):
            raise self._refusal(found)
        return {"medium": MEDIUM, "address": found.address, "validated_at": found.validated_ts}

    # bindings --------------------------------------------------------------------------------

    async def bind(self, user_id: str, sid: str, client_secret: str, mxid: Any) -> dict[str, Any]:
        """Bind a proven address to the caller's own user ID (the session is used up);
        answer the signed association."""
        if not valid_user_id(mxid):
            raise MatrixError(400, "M_INVALID_PARAM", "mxid must be a user ID")
        if mxid != user_id:
            raise MatrixError(403, "M_FORBIDDEN", "you can bind addresses to your own user only")
        now = self.now_ms()

        def fn(tx: Tx) -> _Session | str:
            found = self._proven(tx, sid, client_secret, now)
            if not isinstance(found, _Session):
                return found
            tx.run(
                "INSERT INTO identity_bindings (medium, address, user_id, lookup_hash, bound_ts)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (medium, address) DO UPDATE SET"
                " user_id = excluded.user_id, lookup_hash = excluded.lookup_hash,"
                " bound_ts = excluded.bound_ts",
                (MEDIUM, found.address, mxid, lookup_hash(found.address, MEDIUM, self.pepper),
                 now),
            )  # fmt: skip
            tx.run("DELETE FROM identity_sessions WHERE sid = ?", (sid,))
            return found

        found = await self.db.run(fn, write=True)
        if not isinstance(found, _Session):
            raise self._refusal(found)
        self._bindings.labels("bind").inc()
        log.info("address bound", extra=fields(sid=sid, user=mxid))
        association: dict[str, Any] = {
            "address": found.address,
            "medium": MEDIUM,
            "mxid": mxid,
            "not_before": now,
            "not_after": now + 100 * 365 * 86_400_000,
            "ts": now,
        }
        key = self.hs.signing_key
        return sign_json(association, self.hs.server_name, key.key_id, key)

    async def unbind(self, user_id: str, body: dict[str, Any]) -> None:
        """Remove the caller's own binding of an address."""
        mxid = body.get("mxid")
        threepid = body.get("threepid")
        if not isinstance(threepid, dict) or threepid.get("medium") != MEDIUM:
            raise MatrixError(400, "M_INVALID_PARAM", "threepid must be an email threepid")
        address = parse_email(threepid.get("address"))
        if mxid != user_id:
            raise MatrixError(403, "M_FORBIDDEN", "you can unbind your own addresses only")
        removed = await self.db.run(
            lambda tx: tx.run(
                "DELETE FROM identity_bindings WHERE medium = ? AND address = ? AND user_id = ?",
                (MEDIUM, address, user_id),
            ),
            write=True,
        )
        if not removed:
            raise MatrixError(404, "M_NOT_FOUND", "that address is not bound to you")
        self._bindings.labels("unbind").inc()

    def hash_details(self) -> dict[str, Any]:
        return {"algorithms": ["sha256"], "lookup_pepper": self.pepper}

    async def lookup(self, hashes: Sequence[str]) -> dict[str, str]:
        """The user IDs bound to the given lookup hashes (unknown hashes are left out)."""

        def fn(tx: Tx) -> dict[str, str]:
            found: dict[str, str] = {}
            for start in range(0, len(hashes), 100):
                chunk = hashes[start : start + 100]
                marks = ", ".join("?" for _ in chunk)
                for row in tx.query(
                    "SELECT lookup_hash, user_id FROM identity_bindings"  # noqa: S608
                    f" WHERE lookup_hash IN ({marks})",
                    chunk,
                ):
                    found[str(row[0])] = str(row[1])
            return found

        return await self.db.run(fn) if hashes else {}
