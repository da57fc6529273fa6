"""The sans-IO DHT core: request handling, every refusal of bad input, table upkeep, lookups
driven through cores in memory with explicit time."""

from __future__ import annotations

import hashlib

import pytest

from teia.dht.core import DhtConfig, DhtCore, LookupDriver, Mode, PingRequest, SendRequest, Wait
from teia.dht.messages import Message, MessageType, Peer, Record
from teia.dht.records import Envelope, PeerRecord, SignedPeerRecord, record_key
from teia.errors import (
    BadRecordSignature,
    DhtQuotaExceeded,
    ExpiredRecord,
    InvalidDhtMessage,
    InvalidRecord,
    MalformedRecord,
    OversizeRecord,
    RecordKeyMismatch,
    StaleRecord,
    WrongRecordSigner,
)
from teia.identity import Identity, Multiaddr, PeerId

NOW = 1_700_000_000_000


def identity(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(n.to_bytes(4, "big")).digest())


def addr(n: int) -> Multiaddr:
    return Multiaddr(f"/ip4/10.{n >> 8 & 255}.{n & 255}.1/udp/4001/quic-v1")


def distance(key: bytes, peer: PeerId) -> int:
    target = hashlib.sha256(key).digest()
    other = hashlib.sha256(peer.to_bytes()).digest()
    return int.from_bytes(target, "big") ^ int.from_bytes(other, "big")


def signed(
    who: Identity, *, seq: int = 1, issued: int = NOW, ttl_s: int = 7200, n: int = 1
) -> SignedPeerRecord:
    record = PeerRecord.create(
        who.peer_id, [addr(n)], ["/teia/chat/1.0.0"], seq=seq, issued_at_ms=issued, ttl_s=ttl_s
    )
    return record.sign(who)


def put(record_bytes: bytes, key: bytes) -> Message:
    return Message(MessageType.PUT_VALUE, key=key, record=Record(key=key, value=record_bytes))


@pytest.fixture
def core() -> DhtCore:
    node = DhtCore(identity(0).peer_id)
    for n in range(1, 61):
        node.add_contact(identity(n).peer_id, [addr(n)], NOW)
    return node


# --- requests -------------------------------------------------------------------------------


def test_find_node_answers_the_k_closest_with_addresses_never_the_requester(
    core: DhtCore,
) -> None:
    requester = identity(5).peer_id
    target = identity(1000).peer_id.to_bytes()
    answer = core.handle_request(requester, Message(MessageType.FIND_NODE, key=target), NOW)
    assert answer.type is MessageType.FIND_NODE
    assert answer.key == target
    known = [identity(n).peer_id for n in range(1, 61) if n != 5]
    expected = sorted(known, key=lambda p: distance(target, p))[:20]
    assert [PeerId.from_bytes(p.id) for p in answer.closer_peers] == expected
    for peer in answer.closer_peers:
        n = next(i for i in range(1, 61) if identity(i).peer_id.to_bytes() == peer.id)
        assert peer.multiaddrs() == [addr(n)]
    assert requester.to_bytes() not in {p.id for p in answer.closer_peers}


def test_find_node_for_the_node_itself_names_the_node(core: DhtCore) -> None:
    core.local_addrs = [addr(999).to_bytes()]
    key = core.local.to_bytes()
    answer = core.handle_request(identity(1).peer_id, Message(MessageType.FIND_NODE, key=key), NOW)
    assert answer.closer_peers[0] == Peer(key, (addr(999).to_bytes(),))
    assert len(answer.closer_peers) == 20


def test_ping_and_keyless_requests(core: DhtCore) -> None:
    sender = identity(1).peer_id
    assert core.handle_request(sender, Message(MessageType.PING), NOW) == Message(MessageType.PING)
    with pytest.raises(InvalidDhtMessage, match="needs a key"):
        core.handle_request(sender, Message(MessageType.FIND_NODE), NOW)


def test_put_value_then_get_value(core: DhtCore) -> None:
    alice = identity(100)
    record = signed(alice)
    key = record_key(alice.peer_id)
    answer = core.handle_request(alice.peer_id, put(record.envelope, key), NOW)
    assert answer == put(record.envelope, key)
    assert len(core.store) == 1
    got = core.handle_request(identity(1).peer_id, Message(MessageType.GET_VALUE, key=key), NOW)
    assert got.record == Record(key=key, value=record.envelope)
    assert len(got.closer_peers) == 20
    # Anyone may store someone else's record (replication): the signature is what counts.
    newer = signed(alice, seq=2)
    core.handle_request(identity(7).peer_id, put(newer.envelope, key), NOW)
    got = core.handle_request(identity(1).peer_id, Message(MessageType.GET_VALUE, key=key), NOW)
    assert got.record is not None
    assert got.record.value == newer.envelope
    # A re-publish of the same record is fine and changes nothing.
    core.handle_request(alice.peer_id, put(newer.envelope, key), NOW)
    # Expired records are not served, and are purged.
    later = NOW + 7201 * 1000
    got = core.handle_request(identity(1).peer_id, Message(MessageType.GET_VALUE, key=key), later)
    assert got.record is None
    assert core.purge_expired(later) == 1
    assert len(core.store) == 0


def test_get_value_of_an_unknown_key_gives_closer_peers_only(core: DhtCore) -> None:
    key = b"/other/thing"
    got = core.handle_request(identity(1).peer_id, Message(MessageType.GET_VALUE, key=key), NOW)
    assert got.record is None
    assert len(got.closer_peers) == 20


def _refused(core: DhtCore, request: Message, error: type[Exception], reason: str | None) -> None:
    with pytest.raises(error) as info:
        core.handle_request(identity(9).peer_id, request, NOW)
    if reason is not None:
        assert isinstance(info.value, InvalidRecord)
        assert info.value.reason == reason
    assert len(core.store) == 0


def test_forged_record_is_refused(core: DhtCore) -> None:
    alice = identity(100)
    envelope = bytearray(signed(alice).envelope)
    envelope[-1] ^= 1  # the last byte is in the signature
    _refused(
        core, put(bytes(envelope), record_key(alice.peer_id)), BadRecordSignature, "bad-signature"
    )


def test_record_signed_by_another_key_is_refused(core: DhtCore) -> None:
    alice, mallory = identity(100), identity(101)
    record = PeerRecord.create(alice.peer_id, [addr(1)], seq=5, issued_at_ms=NOW)
    envelope = Envelope.seal(mallory, record.encode()).encode()
    _refused(core, put(envelope, record_key(alice.peer_id)), WrongRecordSigner, "wrong-signer")


def test_record_under_another_peers_key_is_refused(core: DhtCore) -> None:
    alice, bob = identity(100), identity(101)
    envelope = signed(alice).envelope
    _refused(core, put(envelope, record_key(bob.peer_id)), RecordKeyMismatch, "key-mismatch")
    # The record's own key must be the message's key too.
    message = Message(
        MessageType.PUT_VALUE,
        key=record_key(alice.peer_id),
        record=Record(key=record_key(bob.peer_id), value=envelope),
    )
    _refused(core, message, RecordKeyMismatch, "key-mismatch")


def test_older_sequence_number_is_refused_and_the_held_record_stays(core: DhtCore) -> None:
    alice = identity(100)
    key = record_key(alice.peer_id)
    held = signed(alice, seq=10)
    core.handle_request(alice.peer_id, put(held.envelope, key), NOW)
    for stale in (signed(alice, seq=9), signed(alice, seq=10, n=2)):
        with pytest.raises(StaleRecord) as info:
            core.handle_request(alice.peer_id, put(stale.envelope, key), NOW)
        assert info.value.reason == "stale-sequence"
    got = core.store.get(key, NOW)
    assert got is not None
    assert got.envelope == held.envelope


def test_expired_record_is_refused(core: DhtCore) -> None:
    alice = identity(100)
    old = signed(alice, issued=NOW - 3 * 3600 * 1000, ttl_s=3600)
    _refused(core, put(old.envelope, record_key(alice.peer_id)), ExpiredRecord, "expired")


def test_oversize_record_is_refused(core: DhtCore) -> None:
    alice = identity(100)
    _refused(core, put(b"\x0a" * 9000, record_key(alice.peer_id)), OversizeRecord, "oversize")


def test_malformed_values_and_messages_are_refused(core: DhtCore) -> None:
    alice = identity(100)
    key = record_key(alice.peer_id)
    _refused(core, put(b"\xff\xff\xff", key), MalformedRecord, "malformed")
    _refused(core, Message(MessageType.PUT_VALUE, key=key), InvalidDhtMessage, None)
    # Truncated and garbage protobuf on the wire: a clear error, nothing stored.
    request = put(signed(alice).envelope, key).encode()
    for data in (request[:-5], b"\x08\x09", b"\x0a\xff\xff\xff\xff\x0f"):
        with pytest.raises(InvalidDhtMessage):
            core.handle_request_data(alice.peer_id, data, NOW)
    assert len(core.store) == 0
    # The same core keeps answering.
    answer = core.handle_request_data(alice.peer_id, request, NOW)
    assert Message.decode(answer).type is MessageType.PUT_VALUE
    assert len(core.store) == 1


def test_values_outside_the_peer_record_namespace_are_refused(core: DhtCore) -> None:
    alice = identity(100)
    _refused(core, put(signed(alice).envelope, b"/pk/whatever"), RecordKeyMismatch, "key-mismatch")


def test_record_quota() -> None:
    node = DhtCore(identity(0).peer_id, config=DhtConfig(max_records=2))
    for n in (100, 101):
        node.handle_request(
            identity(n).peer_id,
            put(signed(identity(n)).envelope, record_key(identity(n).peer_id)),
            NOW,
        )
    with pytest.raises(DhtQuotaExceeded):
        node.handle_request(
            identity(102).peer_id,
            put(signed(identity(102)).envelope, record_key(identity(102).peer_id)),
            NOW,
        )
    assert len(node.store) == 2


def test_providers_only_for_the_sender_and_bounded() -> None:
    node = DhtCore(identity(0).peer_id, config=DhtConfig(max_providers_per_key=2))
    key = hashlib.sha256(b"content").digest()
    alice, bob = identity(1).peer_id, identity(2).peer_id
    announce = Message(
        MessageType.ADD_PROVIDER,
        key=key,
        provider_peers=(Peer.from_peer_id(alice, [addr(1)]), Peer.from_peer_id(bob, [addr(2)])),
    )
    node.handle_request(alice, announce, NOW)
    got = node.handle_request(bob, Message(MessageType.GET_PROVIDERS, key=key), NOW)
    assert got.provider_peers == (Peer.from_peer_id(alice, [addr(1)]),)
    node.handle_request(
        bob,
        Message(
            MessageType.ADD_PROVIDER, key=key, provider_peers=(Peer.from_peer_id(bob, [addr(2)]),)
        ),
        NOW,
    )
    carol = identity(3).peer_id
    with pytest.raises(DhtQuotaExceeded):
        node.handle_request(
            carol,
            Message(
                MessageType.ADD_PROVIDER,
                key=key,
                provider_peers=(Peer.from_peer_id(carol, [addr(3)]),),
            ),
            NOW,
        )
    got = node.handle_request(bob, Message(MessageType.GET_PROVIDERS, key=key), NOW)
    assert {p.id for p in got.provider_peers} == {alice.to_bytes(), bob.to_bytes()}


# --- routing table upkeep -------------------------------------------------------------------


def test_full_bucket_asks_to_ping_the_oldest_entry() -> None:
    node = DhtCore(identity(0).peer_id, config=DhtConfig(k=1))
    ping: PingRequest | None = None
    newcomer: PeerId | None = None
    for n in range(1, 200):
        newcomer = identity(n).peer_id
        ping = node.add_contact(newcomer, [addr(n)], NOW + n)
        if ping is not None:
            break
    assert ping is not None
    assert newcomer is not None
    assert node.table.contains(ping.peer_id.to_bytes())
    assert not node.table.contains(newcomer.to_bytes())
    assert ping.addrs
    assert ping.addrs[0] in [addr(n) for n in range(1, 200)]
    # The oldest is dead: the newcomer takes its place.
    node.ping_result(ping.peer_id, False, NOW + 500)
    assert not node.table.contains(ping.peer_id.to_bytes())
    assert node.table.contains(newcomer.to_bytes())


def test_the_local_peer_is_never_a_contact() -> None:
    node = DhtCore(identity(0).peer_id)
    assert node.add_contact(identity(0).peer_id, [addr(0)], NOW) is None
    assert len(node.table) == 0


# --- lookups over cores in memory -----------------------------------------------------------


class Network:
    """Cores in memory that answer each other directly (alive unless listed as dead)."""

    def __init__(self, count: int) -> None:
        self.ids = [identity(n) for n in range(count)]
        self.cores = {i.peer_id: DhtCore(i.peer_id) for i in self.ids}
        self.dead: set[PeerId] = set()
        self.now = NOW
        # A line of introductions, then self-lookups, so tables fill as a real network's do.
        for a, b in zip(self.ids, self.ids[1:], strict=False):
            self.cores[b.peer_id].add_contact(a.peer_id, [addr(0)], self.now)
        for i in self.ids:
            self.run(self.cores[i.peer_id].lookup(i.peer_id.to_bytes(), self.now))

    def run(self, lookup: LookupDriver) -> None:
        origin = lookup.core.local
        for _ in range(1000):
            action = lookup.next_action(self.now)
            if action is None:
                return
            if isinstance(action, Wait):
                self.now = action.until_ms
                continue
            assert isinstance(action, SendRequest)
            self.now += 1
            if action.peer_id in self.dead:
                lookup.on_failure(action.peer_id)
                continue
            remote = self.cores[action.peer_id]
            answer = remote.handle_request(origin, action.request, self.now)
            remote.add_contact(origin, [addr(1)], self.now)
            lookup.on_response(action.peer_id, answer, self.now)
        raise AssertionError("lookup did not end")


def test_lookup_finds_the_k_closest_in_a_small_network() -> None:
    net = Network(60)
    target = identity(5000).peer_id.to_bytes()
    origin = net.cores[net.ids[3].peer_id]
    lookup = origin.lookup(target, net.now)
    net.run(lookup)
    result = lookup.finish(net.now)
    others = [i.peer_id for i in net.ids if i.peer_id != origin.local]
    assert [p for p, _ in result.peers] == sorted(others, key=lambda p: distance(target, p))[:20]
    assert result.rounds >= 1
    assert result.requests >= 20
    assert result.failures == 0


def test_get_value_lookup_finds_the_newest_record_and_skips_bad_ones() -> None:
    net = Network(40)
    alice = net.ids[10]
    key = record_key(alice.peer_id)
    holders = list(net.cores.values())
    for core in holders[:5]:
        core.store_record(signed(alice, seq=1), NOW)
    holders[6].store_record(signed(alice, seq=3), NOW)
    origin = net.cores[net.ids[30].peer_id]
    lookup = origin.lookup(key, net.now, kind=MessageType.GET_VALUE)
    net.run(lookup)
    result = lookup.finish(net.now)
    if holders[6].local in {p for p, _ in result.peers}:
        assert result.record is not None
        assert result.record.seq == 3
    assert result.record is not None
    assert result.record.peer_id == alice.peer_id


def test_lookup_evicts_peers_that_never_answer() -> None:
    net = Network(50)
    origin = net.cores[net.ids[0].peer_id]
    dead = [p for p, _ in origin.closest(identity(777).peer_id.to_bytes())][:3]
    net.dead = {PeerId.from_bytes(p) for p in dead}
    lookup = origin.lookup(identity(777).peer_id.to_bytes(), net.now)
    net.run(lookup)
    result = lookup.finish(net.now)
    assert result.failures >= 3
    assert not any(origin.table.contains(p) for p in dead)
    assert not {p for p, _ in result.peers} & net.dead


def test_answers_of_the_wrong_kind_count_as_failures() -> None:
    net = Network(30)
    origin = net.cores[net.ids[0].peer_id]
    lookup = origin.lookup(b"somekey", net.now)
    action = lookup.next_action(net.now)
    assert isinstance(action, SendRequest)
    assert not lookup.on_response(action.peer_id, Message(MessageType.PING), net.now)
    assert not lookup.on_response(
        action.peer_id, Message(MessageType.FIND_NODE, key=b"otherkey"), net.now
    )


def test_an_answer_without_a_key_is_used() -> None:
    # py-libp2p answers FIND_NODE without repeating the key.
    net = Network(30)
    origin = net.cores[net.ids[0].peer_id]
    key = identity(999).peer_id.to_bytes()
    lookup = origin.lookup(key, net.now)
    action = lookup.next_action(net.now)
    assert isinstance(action, SendRequest)
    answer = net.cores[action.peer_id].handle_request(origin.local, action.request, net.now)
    keyless = Message(MessageType.FIND_NODE, closer_peers=answer.closer_peers)
    assert lookup.on_response(action.peer_id, keyless, net.now)


def test_client_mode_is_recorded() -> None:
    assert DhtCore(identity(0).peer_id, mode=Mode.CLIENT).mode is Mode.CLIENT
