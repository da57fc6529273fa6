"""Owner operations: who may list, fetch, acknowledge and delete an inbox, or upload its bundle.

An inbox is named by ``SHA-256(owner's raw Ed25519 public key)`` (`inbox_for`): the store
never learns more than that hash until the owner proves the key. Each owner operation carries
an `OwnerAuth`: the public key, a timestamp, a random 16-byte nonce and an Ed25519 signature
over::

    "teia/store/op/v1\\0" ‖ op (1 byte) ‖ inbox (32) ‖ timestamp_ms (u64 BE) ‖ nonce (16)
        ‖ SHA-256(signed_params(request))

so a signature is good for one operation, on one inbox, with these parameters (cursor and
limit, or the exact message IDs, or the exact bundle), once. `OwnerAuthVerifier` accepts it
when the key hashes to the inbox, the signature verifies, the timestamp is within ±`WINDOW_MS`
of the node's clock and not older than ``not_before_ms``, and the nonce was not seen in the
window. It reads no clock and does no I/O: callers pass ``now_ms``, seed it with the nonces
they kept (``remembered``) and keep each nonce `OwnerAuthVerifier.check` accepts until the
expiry it returns (the store node keeps them in its database, so a restart keeps refusing
replays; ``not_before_ms``, the node's start, is for a database that could not keep them).
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Iterable
from dataclasses import replace
from typing import Final

from teia.errors import StoreAuthError, StoreRequestRefused
from teia.identity import Identity, verify
from teia.store.messages import (
    AckRequest,
    DeleteRequest,
    FetchRequest,
    OwnerAuth,
    PutBundleRequest,
    Request,
    Status,
    signed_params,
)

__all__ = [
    "DEFAULT_MAX_NONCES",
    "WINDOW_MS",
    "OwnerAuthVerifier",
    "OwnerRequest",
    "inbox_for",
    "sign_request",
]

WINDOW_MS: Final = 60_000
DEFAULT_MAX_NONCES: Final = 1_000_000
_DOMAIN: Final = b"teia/store/op/v1\x00"

OwnerRequest = FetchRequest | AckRequest | DeleteRequest | PutBundleRequest

_OPS: Final[dict[type, int]] = {
    FetchRequest: 1,
    AckRequest: 2,
    DeleteRequest: 3,
    PutBundleRequest: 4,
}


def inbox_for(public_key: bytes) -> bytes:
    """The inbox key of an owner: SHA-256 of its raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key).digest()


def _signed_bytes(request: Request, inbox: bytes, timestamp_ms: int, nonce: bytes) -> bytes:
    op = _OPS[type(request)]
    params = hashlib.sha256(signed_params(request)).digest()
    return _DOMAIN + bytes([op]) + inbox + timestamp_ms.to_bytes(8, "big") + nonce + params


def sign_request(identity: Identity, request: OwnerRequest, now_ms: int) -> OwnerRequest:
    """``request`` with a fresh `OwnerAuth` by ``identity`` (its ``auth`` field replaced).

    The request's inbox must be ``inbox_for(identity.public_key)``; the node checks it.
    """
    nonce = secrets.token_bytes(16)
    signature = identity.sign(_signed_bytes(request, request.inbox, now_ms, nonce))
    auth = OwnerAuth(identity.public_key, now_ms, nonce, signature)
    return replace(request, auth=auth)


class OwnerAuthVerifier:
    """Checks owner signatures and remembers nonces for the window; see the module docstring."""

    def __init__(
        self,
        *,
        not_before_ms: int = 0,
        window_ms: int = WINDOW_MS,
        max_nonces: int = DEFAULT_MAX_NONCES,
        remembered: Iterable[tuple[bytes, int]] = (),
    ) -> None:
        self._not_before_ms = not_before_ms
        self._window_ms = window_ms
        self._max_nonces = max_nonces
        # nonce → when it may be forgotten (its timestamp can no longer pass the window).
        self._nonces: dict[bytes, int] = {}
        for nonce, until in itertools.islice(remembered, max_nonces):
            self._nonces[nonce] = until
        self._next_sweep_ms = 0

    @property
    def max_nonces(self) -> int:
        """Nonces in force at most (more are refused as BUSY)."""
        return self._max_nonces

    @property
    def remembered(self) -> int:
        """Nonces currently remembered."""
        return len(self._nonces)

    def check(self, request: OwnerRequest, now_ms: int) -> int:
        """Accept ``request`` (and remember its nonce) or raise `StoreAuthError`
        (`StoreRequestRefused` with BUSY when ``max_nonces`` are in force).

        Returns until when the nonce must be kept (after that its signature is out of the
        window anyway).
        """
        auth = request.auth
        if auth is None:
            raise StoreAuthError("owner operation without a signature", Status.UNAUTHORIZED)
        if inbox_for(auth.public_key) != request.inbox:
            raise StoreAuthError("the public key does not hash to this inbox", Status.UNAUTHORIZED)
        skew = auth.timestamp_ms - now_ms
        if abs(skew) > self._window_ms:
            raise StoreAuthError(
                f"signed at a time {skew / 1000:+.0f} s from the node's clock (allowed: "
                f"±{self._window_ms // 1000} s); check the clock and sign again",
                Status.AUTH_EXPIRED,
            )
        if auth.timestamp_ms < self._not_before_ms:
            raise StoreAuthError(
                "signed before this node restarted; sign the operation again",
                Status.AUTH_EXPIRED,
            )
        signed = _signed_bytes(request, request.inbox, auth.timestamp_ms, auth.nonce)
        if not verify(auth.public_key, signed, auth.signature):
            raise StoreAuthError("the owner signature does not verify", Status.UNAUTHORIZED)
        self._sweep(now_ms)
        if auth.nonce in self._nonces:
            raise StoreAuthError("this signed operation was already used", Status.REPLAYED)
        if len(self._nonces) >= self._max_nonces:
            raise StoreRequestRefused(
                "too many signed operations in the last minute; retry shortly", Status.BUSY
            )
        until = auth.timestamp_ms + self._window_ms
        self._nonces[auth.nonce] = until
        return until

    def _sweep(self, now_ms: int) -> None:
        if now_ms < self._next_sweep_ms and len(self._nonces) < self._max_nonces:
            return
        self._next_sweep_ms = now_ms + 1000
        expired = [nonce for nonce, until in self._nonces.items() if until < now_ms]
        for nonce in expired:
            del self._nonces[nonce]
