"""TURN authentication: long-term credentials (RFC 8489 section 9.2) with stateless nonces,
and time-limited "REST" credentials from a shared secret (as WebRTC deployments use them).

- Static users come from the configuration (``NAME:PASSWORD``).
- REST users need no configuration: the username is ``EXPIRY:USER`` (or just ``EXPIRY``), a
  Unix time after which it is refused, and the password is
  ``base64(HMAC-SHA1(secret, username))``; whoever holds the secret (an app's backend) mints
  them. Both go through the long-term mechanism: key = MD5(username:realm:password).
- Nonces are ``<issued-at, hex><MAC>``, the MAC keyed with the server's nonce secret over the
  issue time and the client's IP address, so the server keeps no nonce table and a nonce is
  useless from another address. A nonce older than ``nonce_lifetime`` is stale (438).

Passwords, keys, secrets and nonces are never logged or put into errors.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from teia.errors import InvalidStunMessage
from teia.relay.stun import Attr, StunMessage, decode_text, long_term_key

__all__ = [
    "DEFAULT_NONCE_LIFETIME",
    "AuthOutcome",
    "AuthResult",
    "RelayAuthenticator",
    "rest_password",
]

DEFAULT_NONCE_LIFETIME = 600.0
"""Seconds a nonce stays fresh (then 438 Stale Nonce, and the client retries with a new one)."""
_NONCE_MAC_BYTES = 12
_MAX_TIME_DIGITS = 12


def rest_password(secret: bytes, username: str) -> str:
    """The password of a time-limited credential: base64(HMAC-SHA1(secret, username))."""
    mac = hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(mac).decode("ascii")


class AuthOutcome(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenge"
    """401: no MESSAGE-INTEGRITY (the first request), an unknown or expired user, or a
    MESSAGE-INTEGRITY that does not verify. The answer carries REALM and a fresh NONCE."""
    STALE_NONCE = "stale-nonce"
    """438: the nonce is too old or not ours. The answer carries REALM and a fresh NONCE."""
    BAD_REQUEST = "bad-request"
    """400: MESSAGE-INTEGRITY without USERNAME, REALM or NONCE, or such an attribute that
    does not decode."""


@dataclass(frozen=True, slots=True)
class AuthResult:
    outcome: AuthOutcome
    username: str = ""
    key: bytes = b""
    """The long-term key, to sign the response with (empty unless OK)."""
    reason: str = ""
    """For logs and metrics: one word, never a secret."""


class RelayAuthenticator:
    """Checks requests against the configured users and REST secret; issues nonces."""

    def __init__(
        self,
        realm: str,
        *,
        nonce_secret: bytes,
        users: Mapping[str, str] | None = None,
        rest_secret: bytes | None = None,
        nonce_lifetime: float = DEFAULT_NONCE_LIFETIME,
    ) -> None:
        if not realm:
            raise ValueError("a TURN realm must not be empty")
        if len(nonce_secret) < 16:
            raise ValueError("the nonce secret must be at least 16 bytes")
        self.realm = realm
        self._nonce_secret = nonce_secret
        self._rest_secret = rest_secret or None
        self._nonce_lifetime = nonce_lifetime
        # Keys, not passwords, are kept: they are what checking needs.
        self._static_keys = {
            name: long_term_key(name, realm, password) for name, password in (users or {}).items()
        }

    def __repr__(self) -> str:
        return f"RelayAuthenticator(realm={self.realm!r}, users={len(self._static_keys)})"

    # --- nonces -------------------------------------------------------------------------------

    def _nonce_mac(self, issued: str, client_ip: str) -> str:
        mac = hmac.new(
            self._nonce_secret, f"{issued}|{client_ip}".encode(), hashlib.sha256
        ).digest()[:_NONCE_MAC_BYTES]
        return base64.urlsafe_b64encode(mac).decode("ascii")

    def new_nonce(self, client_ip: str, now: float) -> str:
        issued = f"{int(now):x}"
        return issued + "-" + self._nonce_mac(issued, client_ip)

    def nonce_is_fresh(self, nonce: str, client_ip: str, now: float) -> bool:
        issued, sep, mac = nonce.partition("-")
        if not sep or not 0 < len(issued) <= _MAX_TIME_DIGITS:
            return False
        try:
            issued_at = int(issued, 16)
        except ValueError:
            return False
        if not hmac.compare_digest(mac, self._nonce_mac(issued, client_ip)):
            return False
        # A nonce from the future (clock stepped back) is as stale as an old one.
        return issued_at <= now + 1 and now - issued_at <= self._nonce_lifetime

    # --- keys ---------------------------------------------------------------------------------

    def key_for(self, username: str, now: float) -> bytes | None:
        """The long-term key of ``username``, or None if unknown or (REST) expired."""
        key = self._static_keys.get(username)
        if key is not None:
            return key
        if self._rest_secret is None:
            return None
        expiry_text = username.split(":", 1)[0]
        if not expiry_text.isdigit() or len(expiry_text) > _MAX_TIME_DIGITS:
            return None
        if int(expiry_text) < now:
            return None
        password = rest_password(self._rest_secret, username)
        return long_term_key(username, self.realm, password)

    # --- requests -----------------------------------------------------------------------------

    def authenticate(self, message: StunMessage, client_ip: str, now: float) -> AuthResult:
        """Apply RFC 8489 section 9.2.4 to a request, in the RFC's order."""
        if not message.has_integrity:
            return AuthResult(AuthOutcome.CHALLENGE, reason="no-integrity")
        raw_username = message.get(Attr.USERNAME)
        raw_realm = message.get(Attr.REALM)
        raw_nonce = message.get(Attr.NONCE)
        if raw_username is None or raw_realm is None or raw_nonce is None:
            return AuthResult(AuthOutcome.BAD_REQUEST, reason="missing-credentials")
        try:
            username = decode_text(Attr.USERNAME, raw_username)
            realm = decode_text(Attr.REALM, raw_realm)
            nonce = decode_text(Attr.NONCE, raw_nonce)
        except InvalidStunMessage:
            return AuthResult(AuthOutcome.BAD_REQUEST, reason="bad-credentials")
        if not self.nonce_is_fresh(nonce, client_ip, now):
            return AuthResult(AuthOutcome.STALE_NONCE, username=username, reason="stale-nonce")
        if realm != self.realm:
            return AuthResult(AuthOutcome.CHALLENGE, username=username, reason="wrong-realm")
        key = self.key_for(username, now)
        if key is None:
            return AuthResult(AuthOutcome.CHALLENGE, username=username, reason="unknown-user")
        if not message.verify_integrity(key):
            return AuthResult(AuthOutcome.CHALLENGE, username=username, reason="bad-integrity")
        return AuthResult(AuthOutcome.OK, username=username, key=key)
