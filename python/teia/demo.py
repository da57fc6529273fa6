"""``teia demo``: what ``make demo`` runs.

Today it shows the foundation end to end, in one process and with no configuration: identities
with libp2p peer IDs, an X3DH handshake from a published prekey bundle, a Double Ratchet
conversation with messages delivered out of order, a replayed and a forged message being refused,
and a small group using sender keys. Every message is checked to arrive intact. The network demo
(discovery, relay and store nodes on loopback) replaces this as those services land.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from teia import crypto
from teia.errors import DecryptionError, DuplicateMessage
from teia.identity import Identity


def register(sub: Any) -> None:
    """Register ``teia demo``."""
    p = sub.add_parser(
        "demo",
        help="run the demo with embedded defaults",
        description="Show identities, X3DH, the Double Ratchet and group sender keys end to end.",
    )
    p.add_argument("--messages", type=int, default=20, help="messages per direction (default 20)")
    p.add_argument("--seed", type=int, default=None, help="seed for the delivery order shuffle")
    p.set_defaults(handler=run)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every message arrived intact."""
    rng = random.Random(args.seed)  # noqa: S311 -- delivery order only, not key material
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    _say("identities")
    for name, ident in (("alice", alice), ("bob", bob), ("carol", carol)):
        _say(f"  {name:6} {ident.peer_id}")

    # Bob publishes a bundle: identity key, a signed prekey and one one-time prekey.
    spk = crypto.SignedPrekey.generate(bob.private_seed, 1)
    opk = crypto.OneTimePrekey.generate(100)
    bundle = crypto.PrekeyBundle(
        bob.public_key, spk.id, spk.public_key, spk.signature, opk.id, opk.public_key
    )
    t0 = time.perf_counter()
    a_session = crypto.Session.initiate(alice.private_seed, bundle)
    first = a_session.encrypt(b"hello bob, this is alice")
    b_session, plaintext = crypto.Session.accept(bob.private_seed, spk, opk, first)
    handshake_ms = (time.perf_counter() - t0) * 1000
    assert plaintext == b"hello bob, this is alice"
    _say(f"X3DH handshake + first message: {handshake_ms:.2f} ms ({len(first)} bytes on the wire)")

    # A conversation: each side sends a burst, delivered shuffled.
    ok = 0
    for direction, (sender, receiver) in enumerate(
        ((b_session, a_session), (a_session, b_session), (b_session, a_session))
    ):
        texts = [f"message {i} of burst {direction}".encode() for i in range(args.messages)]
        wire = [(t, sender.encrypt(t)) for t in texts]
        rng.shuffle(wire)
        for text, message in wire:
            if receiver.decrypt(message) != text:
                _say("  MISMATCH")
                return 1
            ok += 1
    _say(f"ratchet conversation: {ok} messages in shuffled order, all intact")

    replayed = a_session.encrypt(b"only once")
    assert b_session.decrypt(replayed) == b"only once"
    try:
        b_session.decrypt(replayed)
    except DuplicateMessage:
        _say("replayed message: refused (DuplicateMessage)")
    forged = bytearray(a_session.encrypt(b"do not tamper"))
    forged[-1] ^= 0x01
    try:
        b_session.decrypt(bytes(forged))
    except DecryptionError:
        _say("forged message: refused (DecryptionError), session unaffected")
    assert b_session.decrypt(a_session.encrypt(b"still fine")) == b"still fine"

    # A group: each member hands its sender key to the others (here directly; in the product it
    # travels inside the pairwise sessions).
    members = {"alice": alice, "bob": bob, "carol": carol}
    senders = {name: crypto.GroupSenderKey.generate() for name in members}
    receivers = {
        (reader, writer): crypto.GroupReceiverKey.from_distribution_message(
            senders[writer].distribution_message()
        )
        for reader in members
        for writer in members
        if reader != writer
    }
    delivered = 0
    for writer in members:
        message = senders[writer].encrypt(f"{writer} says hi to the group".encode())
        for reader in members:
            if reader != writer:
                got = receivers[(reader, writer)].decrypt(message)
                assert got == f"{writer} says hi to the group".encode()
                delivered += 1
    _say(f"group of {len(members)}: {delivered} deliveries with signed sender-key messages, intact")
    _say("demo finished: every message arrived intact")
    return 0
