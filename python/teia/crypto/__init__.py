"""End-to-end encryption: X3DH, the Double Ratchet and sender keys (the Rust core, re-exported).

A pairwise conversation starts with :meth:`Session.initiate` from the responder's
:class:`PrekeyBundle`; the responder finds its keys with :func:`parse_prekey_message` and answers
with :meth:`Session.accept`. Groups use :class:`GroupSenderKey` / :class:`GroupReceiverKey`.
Errors are the classes of :mod:`teia.errors`; parameters and wire formats are in
``docs/crypto.md``. Serialised state holds secrets: encrypt it at rest.
"""

from __future__ import annotations

from teia._native import (
    GroupReceiverKey,
    GroupSenderKey,
    OneTimePrekey,
    PrekeyBundle,
    PrekeyMessageInfo,
    RatchetState,
    Session,
    SignedPrekey,
    is_prekey_message,
    parse_prekey_message,
)

__all__ = [
    "GroupReceiverKey",
    "GroupSenderKey",
    "OneTimePrekey",
    "PrekeyBundle",
    "PrekeyMessageInfo",
    "RatchetState",
    "Session",
    "SignedPrekey",
    "is_prekey_message",
    "parse_prekey_message",
]
