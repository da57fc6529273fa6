"""``teia demo``: what ``make demo`` runs.

On loopback, with no configuration, it starts the operator fleet in one process — a discovery
node, a TURN relay and three store nodes — and three peers with throwaway profiles in a
temporary directory, then shows the three delivery paths of the product:

- alice and bob talk **directly** (bob found through the DHT by his peer ID alone);
- carol's network "blocks UDP between peers", so her conversation with bob goes **through
  the relay** (QUIC end to end inside the relayed datagrams);
- alice writes to carol while carol is **offline**: the envelopes wait on the store nodes
  (sealed: the stores learn neither sender nor content), and carol fetches them when she
  comes back.

Each delivery prints its path and latency; every message is checked to arrive intact, and
everything stops and is removed at the end. ``teia demo --crypto`` runs the earlier in-process
tour of the crypto core instead (X3DH, the Double Ratchet, sender keys).
"""

from __future__ import annotations

import argparse
import logging
import random
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from teia import crypto
from teia.errors import DecryptionError, DuplicateMessage, TeiaError
from teia.identity import Identity, Multiaddr
from teia.identity.keystore import KdfParams


def register(sub: Any) -> None:
    """Register ``teia demo``."""
    p = sub.add_parser(
        "demo",
        help="run the demo with embedded defaults",
        description="Show identities, X3DH, the Double Ratchet and group sender keys end to end.",
    )
    p.add_argument("--messages", type=int, default=5, help="messages per conversation (default 5)")
    p.add_argument("--seed", type=int, default=None, help="seed for the delivery order shuffle")
    p.add_argument(
        "--crypto", action="store_true", help="only the in-process tour of the crypto core"
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="give up after SECONDS (default 120)"
    )
    p.set_defaults(handler=run)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every message arrived intact."""
    if not 1 <= args.messages <= 1000:
        raise DemoFailed("--messages must be between 1 and 1000")
    if args.crypto:
        return run_crypto(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("quic").setLevel(logging.CRITICAL)
    try:
        return anyio.run(_network_demo, args, backend="trio")
    except DemoFailed as exc:
        _say(f"demo FAILED: {exc}")
        return 1


def run_crypto(args: argparse.Namespace) -> int:
    """The in-process tour of the crypto core; returns 0 when every message arrived intact."""
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


# --- the network demo -----------------------------------------------------------------------


class DemoFailed(TeiaError):
    """A demo message did not arrive intact (or in time)."""


# Throwaway profiles in a temporary directory: a light Argon2id keeps the demo quick. Real
# profiles (`teia init`) use the keystore's default parameters.
_DEMO_KDF = KdfParams(memory_kib=8 * 1024, iterations=1)
_PASSPHRASE = secrets.token_urlsafe(16)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def _fleet(workdir: Path) -> AsyncIterator[tuple[str, list[str], dict[str, object]]]:
    """Discovery node, relay and three store nodes on loopback.

    Yields (bootstrap address, store node addresses, relay table for the peers' profiles).
    """
    from teia.dht.node import DhtNode
    from teia.host.host import Host
    from teia.relay.service import RelayConfig, build_server
    from teia.store import InboxStore, StaticMembership, StoreNode, StoreNodeInfo, StoreSettings

    relay_secret = secrets.token_urlsafe(24)
    async with AsyncExitStack() as stack:
        host = await stack.enter_async_context(Host(Identity.generate()))
        await stack.enter_async_context(DhtNode(host))
        bootstrap = str(host.addrs[0])
        _say(f"  discovery  {bootstrap}")

        server = await stack.enter_async_context(
            build_server(
                RelayConfig(
                    # Its own loopback address, so peers can tell relayed connections apart.
                    listen="127.0.0.2:0",
                    realm="teia.demo",
                    auth_secret=relay_secret,
                    allow_peer=["127.0.0.0/8"],
                    data_dir=workdir / "relay",
                    tcp=False,
                )
            )
        )
        relay = {
            "address": f"127.0.0.2:{server.port}",
            "rest_secret": relay_secret,
            "keepalive": 5.0,
        }
        _say(f"  relay      127.0.0.2:{server.port} (STUN/TURN, Rust data plane)")

        identities = [Identity.generate() for _ in range(3)]
        ports = [_free_udp_port() for _ in identities]
        infos = [
            StoreNodeInfo(i.peer_id, (Multiaddr(f"/ip4/127.0.0.1/udp/{p}/quic-v1"),))
            for i, p in zip(identities, ports, strict=True)
        ]
        membership = StaticMembership(infos)
        settings = StoreSettings(purge_interval=0, anti_entropy_interval=0)
        stores = []
        for index, (identity, port) in enumerate(zip(identities, ports, strict=True)):
            inbox = stack.enter_context(InboxStore(workdir / f"store{index}.db"))
            node_host = await stack.enter_async_context(
                Host(identity, listen=[f"/ip4/127.0.0.1/udp/{port}/quic-v1"], dial_timeout=2.0)
            )
            await stack.enter_async_context(
                StoreNode(node_host, inbox, membership=membership, settings=settings)
            )
            stores.append(f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{identity.peer_id}")
            _say(f"  store {index + 1}    {stores[-1]}")
        yield bootstrap, stores, relay


def _profile(directory: Path, **settings: Any) -> Path:
    from teia.peer.profile import PeerConfig, Profile

    settings.setdefault("retry_interval", 0.3)
    settings.setdefault("store_poll_interval", 0.5)
    settings.setdefault("one_time_prekeys", 10)
    Profile.create(directory, _PASSPHRASE, kdf=_DEMO_KDF, config=PeerConfig(**settings)).close()
    return directory


@asynccontextmanager
async def _online(directory: Path) -> AsyncIterator[Any]:
    from teia.peer import Peer

    async with Peer.open(directory, passphrase=_PASSPHRASE, dial_timeout=1.0) as peer:
        yield peer


async def _converse(sender: Any, recipient: Any, texts: list[str], label: str) -> int:
    """Send ``texts``; wait until each is delivered and arrived intact; print path + latency."""
    since = None
    for message in await recipient.history(sender.peer_id):
        since = message.seq if since is None else max(since, message.seq)
    for text in texts:
        started = time.perf_counter()
        row = await sender.wait_delivered(await sender.send(recipient.peer_id, text))
        elapsed = (time.perf_counter() - started) * 1000
        latency = row.latency_ms if row.latency_ms is not None else elapsed
        _say(f"    {label}: {row.path:8} {latency:7.2f} ms  {text!r}")
    got = await _receive(recipient, len(texts), since, sender.peer_id)
    if got != texts:
        raise DemoFailed(f"{label}: sent {texts!r}, received {got!r}")
    return len(texts)


async def _receive(peer: Any, count: int, since: int | None, sender: Any) -> list[str]:
    """The next ``count`` texts from ``sender`` after history position ``since``."""
    texts: list[str] = []
    async for message in peer.messages(since_seq=since):
        if message.sender != sender:
            continue
        texts.append(message.text)
        if len(texts) == count:
            break
    return texts


async def _network_demo(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)  # noqa: S311 -- wording of demo messages only
    words = ["hello", "olá", "teia", "mesh", "quic", "ratchet", "relay", "store", "hi"]

    def texts(prefix: str) -> list[str]:
        return [f"{prefix} {i + 1}: {rng.choice(words)}" for i in range(args.messages)]

    delivered = 0
    with anyio.fail_after(args.timeout), tempfile.TemporaryDirectory(prefix="teia-demo-") as tmp:
        workdir = Path(tmp)
        _say("operator fleet on loopback")
        async with _fleet(workdir) as (bootstrap, stores, relay):
            common: dict[str, Any] = {"bootstrap": [bootstrap], "store_nodes": stores}
            alice_dir = _profile(workdir / "alice", **common)
            bob_dir = _profile(workdir / "bob", relays=[relay], **common)
            carol_dir = _profile(workdir / "carol", relays=[relay], direct=False, **common)
            _say("peers")
            # Carol goes online once (her prekey bundle lands on the store nodes), then off.
            async with _online(carol_dir) as carol:
                carol_id = carol.peer_id
                await carol.wait_published()
                _say(f"  carol  {carol_id}  (online once, then offline)")
            async with _online(bob_dir) as bob, _online(alice_dir) as alice:
                await bob.wait_published()
                await bob.host.wait_relayed_addrs()
                _say(f"  alice  {alice.peer_id}")
                _say(f"  bob    {bob.peer_id}")

                _say("1. direct: alice knows only bob's peer ID; the DHT says where he is")
                delivered += await _converse(alice, bob, texts("alice→bob"), "alice→bob")
                delivered += await _converse(bob, alice, texts("bob→alice"), "bob→alice")

                _say("2. stored: carol is offline; alice's messages wait on the store nodes")
                sent = texts("alice→carol")
                # Sent together: the first attempt finds carol unreachable (direct and relayed
                # dials time out), and the whole batch goes to the store nodes.
                ids = [await alice.send(carol_id, text) for text in sent]
                for message_id, text in zip(ids, sent, strict=True):
                    row = await alice.wait_delivered(message_id)
                    if row.path != "stored":
                        raise DemoFailed(f"expected the stored path, got {row.path}")
                    _say(f"    alice→carol: {row.path:8} {row.latency_ms or 0:7.2f} ms  {text!r}")

                async with _online(carol_dir) as carol:
                    _say("   carol comes back: fetch, decrypt, persist, then acknowledge")
                    got = await _receive(carol, len(sent), None, alice.peer_id)
                    if got != sent:
                        raise DemoFailed(f"carol received {got!r}, expected {sent!r}")
                    _say(f"    carol has all {len(got)} stored messages, intact, in order")
                    delivered += len(got)

                    _say("3. relayed: carol's network blocks UDP between peers")
                    await carol.host.wait_relayed_addrs()
                    delivered += await _converse(carol, bob, texts("carol→bob"), "carol→bob")
                    delivered += await _converse(bob, carol, texts("bob→carol"), "bob→carol")
        _say(f"demo finished: {delivered} messages delivered, every one intact")
        _say("(stopped every node and peer; removed the temporary directory)")
    return 0
