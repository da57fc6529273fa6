"""kad-dht wire messages: known answers from the spec's proto, round trips, strictness, framing."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.dht.messages import (
    ConnectionType,
    FrameDecoder,
    Message,
    MessageLimits,
    MessageType,
    Peer,
    Record,
    frame,
    parse_peers,
    receive_message,
    send_message,
)
from teia.errors import InvalidDhtMessage, MessageTooLarge
from teia.host.protobuf import encode_bytes_field, encode_uvarint
from teia.identity import Identity, Multiaddr

REPO = Path(__file__).resolve().parents[2]
PYLIBP2P = os.environ.get("TEIA_PYLIBP2P_PYTHON") or str(REPO / ".venv-libp2p" / "bin" / "python")

# FIND_NODE, key "abc", one closer peer (id 01 02, one ip4 address, CONNECTED), byte by byte:
FIND_NODE_BYTES = bytes.fromhex(
    "0804"  # field 1 (type), varint: FIND_NODE = 4
    "1203616263"  # field 2 (key), 3 bytes "abc"
    "420d"  # field 8 (closerPeers), a 13-byte Peer:
    "0a020102"  # field 1 (id), 2 bytes
    "1205047f000001"  # field 2 (addrs), /ip4/127.0.0.1 (code 4, 4 bytes)
    "1801"  # field 3 (connection), varint: CONNECTED = 1
)
FIND_NODE = Message(
    MessageType.FIND_NODE,
    key=b"abc",
    closer_peers=(Peer(b"\x01\x02", (b"\x04\x7f\x00\x00\x01",), ConnectionType.CONNECTED),),
)

# PUT_VALUE is type 0: proto3 leaves the field out entirely.
PUT_VALUE_BYTES = bytes.fromhex(
    "12016b"  # field 2 (key), "k"
    "1a06"  # field 3 (record), 6 bytes:
    "0a016b"  # Record field 1 (key), "k"
    "120176"  # Record field 2 (value), "v"
)
PUT_VALUE = Message(MessageType.PUT_VALUE, key=b"k", record=Record(key=b"k", value=b"v"))

# GET_PROVIDERS answer with a providerPeers entry and a Record.timeReceived.
GET_PROVIDERS_BYTES = bytes.fromhex(
    "0803"  # type GET_PROVIDERS
    "1a05"  # record, 5 bytes:
    "2a03"  # Record field 5 (timeReceived), 3 bytes
    "6e6f77"  # "now"
    "4a04"  # field 9 (providerPeers), 4 bytes
    "0a0209"  # Peer id, 2 bytes: 09 ...
    "09"
    "5001"  # field 10 (clusterLevelRaw) = 1
)
GET_PROVIDERS = Message(
    MessageType.GET_PROVIDERS,
    record=Record(time_received="now"),
    provider_peers=(Peer(b"\x09\x09"),),
    cluster_level=1,
)

KNOWN = [
    (FIND_NODE, FIND_NODE_BYTES),
    (PUT_VALUE, PUT_VALUE_BYTES),
    (GET_PROVIDERS, GET_PROVIDERS_BYTES),
]


@pytest.mark.parametrize(("message", "encoded"), KNOWN)
def test_known_answers(message: Message, encoded: bytes) -> None:
    assert message.encode() == encoded
    assert Message.decode(encoded) == message


def test_ping_is_two_bytes() -> None:
    assert Message(MessageType.PING).encode() == b"\x08\x05"
    assert Message.decode(b"") == Message(MessageType.PUT_VALUE)


# --- hypothesis -----------------------------------------------------------------------------

peers = st.builds(
    Peer,
    id=st.binary(min_size=1, max_size=40),
    addrs=st.lists(st.binary(max_size=30), max_size=4).map(tuple),
    connection=st.sampled_from(ConnectionType),
)
records = st.builds(
    Record,
    key=st.binary(max_size=40),
    value=st.binary(max_size=200),
    time_received=st.text(max_size=20),
)
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    key=st.binary(max_size=60),
    record=st.none() | records,
    closer_peers=st.lists(peers, max_size=5).map(tuple),
    provider_peers=st.lists(peers, max_size=5).map(tuple),
    cluster_level=st.integers(0, (1 << 31) - 1),
)


@given(messages)
def test_round_trip(message: Message) -> None:
    assert Message.decode(message.encode()) == message


@given(st.binary(max_size=400))
def test_garbage_is_a_message_or_invalid_dht_message(data: bytes) -> None:
    with contextlib.suppress(InvalidDhtMessage):
        Message.decode(data)


@given(messages, st.data())
def test_mutated_messages_raise_only_invalid_dht_message(
    message: Message, data: st.DataObject
) -> None:
    encoded = bytearray(message.encode())
    if encoded:
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    with contextlib.suppress(InvalidDhtMessage):
        Message.decode(bytes(encoded))


@pytest.mark.parametrize(("message", "encoded"), KNOWN)
def test_every_truncation_is_rejected_or_a_prefix_message(message: Message, encoded: bytes) -> None:
    # A protobuf cut between two fields is a valid (shorter) message; cut inside one it is not.
    for length in range(len(encoded)):
        try:
            decoded = Message.decode(encoded[:length])
        except InvalidDhtMessage:
            continue
        assert decoded != message


def test_truncation_inside_fields_is_rejected() -> None:
    for cut in (1, 3, 5, 6, 8, 12, 20, len(FIND_NODE_BYTES) - 1):
        with pytest.raises(InvalidDhtMessage):
            Message.decode(FIND_NODE_BYTES[:cut])


# --- strictness -----------------------------------------------------------------------------


def test_unknown_fields_are_skipped() -> None:
    unknown = (
        encode_bytes_field(11, b"sender record")  # py-libp2p's senderRecord
        + encode_uvarint(12 << 3)
        + encode_uvarint(300)
        + encode_uvarint(13 << 3 | 5)
        + b"\0" * 4
        + encode_uvarint(14 << 3 | 1)
        + b"\0" * 8
    )
    peer = Peer(b"\x01", (b"a",)).encode() + encode_bytes_field(4, b"signed record")
    data = FIND_NODE_BYTES + unknown + encode_bytes_field(9, peer)
    decoded = Message.decode(data)
    assert decoded.provider_peers == (Peer(b"\x01", (b"a",)),)
    assert decoded.closer_peers == FIND_NODE.closer_peers


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encode_bytes_field(1, b"\x04"), "varint"),
        (encode_uvarint(2 << 3) + b"\x01", "length-delimited"),
        (encode_uvarint(8 << 3) + b"\x01", "length-delimited"),
        (encode_uvarint(3 << 3 | 5) + b"\0" * 4, "length-delimited"),
        (b"\x08\x06", "unknown message type"),
        (b"\x08\x04\x08\x04", "more than once"),
        (encode_bytes_field(2, b"a") * 2, "more than once"),
        (encode_bytes_field(8, b""), "without an id"),
        (encode_bytes_field(8, encode_bytes_field(2, b"addr")), "without an id"),
        (encode_bytes_field(8, b"\x0a\x01\x01" * 2), "more than once"),
        (encode_bytes_field(3, encode_bytes_field(5, b"\xff")), "UTF-8"),
        (encode_bytes_field(3, b"\x08\x01"), "length-delimited"),
        (encode_uvarint(10 << 3) + encode_uvarint(1 << 31), "out of range"),
        (encode_uvarint(1 << 3 | 3), "wire type"),
        (b"\x00\x00", "field number 0"),
        (b"\x12\x05abc", "past the end"),
        (b"\x08\x80", "truncated"),
        (b"\x08\x80\x00", "minimal"),
        (b"\x08" + b"\xff" * 9 + b"\x01", "longer"),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(InvalidDhtMessage, match=match):
        Message.decode(data)


def test_unknown_connection_type_reads_as_not_connected() -> None:
    peer = encode_bytes_field(1, b"\x01") + encode_uvarint(3 << 3) + encode_uvarint(9)
    decoded = Message.decode(encode_bytes_field(8, peer))
    assert decoded.closer_peers[0].connection is ConnectionType.NOT_CONNECTED


SMALL = MessageLimits(
    max_message_size=300,
    max_peers=2,
    max_addrs=2,
    max_addr_size=8,
    max_peer_id_size=4,
    max_key_size=5,
    max_value_size=6,
    max_time_received_size=3,
)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (Message(MessageType.FIND_NODE, key=b"123456"), "message key"),
        (Message(MessageType.PUT_VALUE, record=Record(key=b"123456")), "record key"),
        (Message(MessageType.PUT_VALUE, record=Record(value=b"1234567")), "record value"),
        (Message(MessageType.PUT_VALUE, record=Record(time_received="1234")), "timeReceived"),
        (Message(MessageType.FIND_NODE, closer_peers=(Peer(b"\x01"),) * 3), "closerPeers"),
        (Message(MessageType.FIND_NODE, provider_peers=(Peer(b"\x01"),) * 3), "providerPeers"),
        (Message(MessageType.FIND_NODE, closer_peers=(Peer(b"12345"),)), "peer id"),
        (Message(MessageType.FIND_NODE, closer_peers=(Peer(b"1", (b"a",) * 3),)), "addresses"),
        (Message(MessageType.FIND_NODE, closer_peers=(Peer(b"1", (b"123456789",)),)), "address"),
    ],
)
def test_limits_on_decode_and_encode(message: Message, match: str) -> None:
    encoded = message.encode()  # within the default limits
    with pytest.raises(InvalidDhtMessage, match=match):
        Message.decode(encoded, SMALL)
    with pytest.raises(InvalidDhtMessage, match=match):
        message.encode(SMALL)


def test_message_size_limit() -> None:
    message = Message(MessageType.PUT_VALUE, record=Record(value=b"x" * 16 * 1024))
    limits = MessageLimits(max_message_size=1000)
    with pytest.raises(InvalidDhtMessage, match="over the 1000-byte limit"):
        message.encode(limits)
    with pytest.raises(InvalidDhtMessage, match="over the 1000-byte limit"):
        Message.decode(message.encode(), limits)
    too_many = Message(
        MessageType.FIND_NODE, closer_peers=(Peer(b"\x01" * 38, (b"\x00" * 40,) * 32),) * 64
    )
    with pytest.raises(InvalidDhtMessage, match="65536-byte limit"):
        too_many.encode()


def test_encode_refuses_what_decode_would() -> None:
    with pytest.raises(InvalidDhtMessage, match="needs an id"):
        Message(MessageType.FIND_NODE, closer_peers=(Peer(b""),)).encode()
    with pytest.raises(InvalidDhtMessage, match="out of range"):
        Message(MessageType.PING, cluster_level=-1).encode()


# --- peers ----------------------------------------------------------------------------------


def test_peer_ids_and_addresses() -> None:
    identity = Identity.generate()
    address = Multiaddr("/ip4/192.0.2.1/udp/4001/quic-v1")
    relayed = Multiaddr(f"/ip4/192.0.2.9/udp/4001/quic-v1/p2p/{identity.peer_id}/p2p-circuit")
    peer = Peer.from_peer_id(identity.peer_id, [address, relayed], ConnectionType.CAN_CONNECT)
    decoded = Message.decode(Message(MessageType.FIND_NODE, closer_peers=(peer,)).encode())
    assert decoded.closer_peers[0].peer_id() == identity.peer_id
    assert decoded.closer_peers[0].multiaddrs() == [address, relayed]

    odd = Peer(identity.peer_id.to_bytes(), (b"\xff\xff\xff", address.to_bytes()))
    assert odd.multiaddrs() == [address]  # an address teia cannot parse is skipped
    bad = Peer(b"\x01\x02\x03")
    with pytest.raises(InvalidDhtMessage, match="not a peer ID"):
        bad.peer_id()
    assert parse_peers([bad, odd, peer]) == [
        (identity.peer_id, [address]),
        (identity.peer_id, [address, relayed]),
    ]


# --- framing --------------------------------------------------------------------------------


def test_frame_and_decode_in_every_split() -> None:
    stream = frame(FIND_NODE) + frame(PUT_VALUE) + frame(Message(MessageType.PING))
    assert stream[:1] == bytes([len(FIND_NODE_BYTES)])
    for split in range(len(stream) + 1):
        decoder = FrameDecoder()
        out = []
        for chunk in (stream[:split], stream[split:]):
            decoder.receive_data(chunk)
            while (message := decoder.next_message()) is not None:
                out.append(message)
        assert out == [FIND_NODE, PUT_VALUE, Message(MessageType.PING)]
        assert decoder.buffered == 0


def test_frame_decoder_byte_by_byte_and_limits() -> None:
    decoder = FrameDecoder(MessageLimits(max_message_size=200))
    for byte in frame(FIND_NODE):
        assert decoder.next_message() is None
        decoder.receive_data(bytes([byte]))
    assert decoder.next_message() == FIND_NODE
    with pytest.raises(InvalidDhtMessage, match="over the 200-byte limit"):
        decoder.receive_data(encode_uvarint(201))  # refused before its body arrives
    with pytest.raises(InvalidDhtMessage, match="length prefix"):
        FrameDecoder().receive_data(b"\x80\x00")
    with pytest.raises(InvalidDhtMessage, match="length prefix"):
        FrameDecoder().receive_data(b"\xff" * 10)
    partial = FrameDecoder()
    partial.receive_data(b"\x05\x08")
    assert partial.next_message() is None
    assert partial.buffered == 2
    bad_body = FrameDecoder()
    bad_body.receive_data(b"\x02\x08\x09")
    with pytest.raises(InvalidDhtMessage, match="unknown message type"):
        bad_body.next_message()


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_message(self, message: bytes) -> None:
        self.sent.append(message)

    async def receive_message(self, max_size: int = 1 << 20) -> bytes:
        message = self.sent.pop(0)
        if len(message) > max_size:
            raise MessageTooLarge(f"message of {len(message)} bytes is over the limit")
        return message


@pytest.mark.anyio
async def test_stream_helpers() -> None:
    pipe = _Pipe()
    await send_message(pipe, FIND_NODE)
    assert pipe.sent == [FIND_NODE_BYTES]
    assert await receive_message(pipe) == FIND_NODE
    await send_message(pipe, FIND_NODE)
    with pytest.raises(InvalidDhtMessage, match="over"):
        await receive_message(pipe, MessageLimits(max_message_size=10))
    pipe.sent.append(b"\x08\x09")
    with pytest.raises(InvalidDhtMessage):
        await receive_message(pipe)


# --- interoperability -----------------------------------------------------------------------

_PYLIBP2P_SCRIPT = """
import json, sys
from libp2p.kad_dht.pb import kademlia_pb2 as pb
theirs = []
for hex_message in json.loads(sys.argv[1]):
    m = pb.Message()
    m.ParseFromString(bytes.fromhex(hex_message))
    theirs.append(m.SerializeToString().hex())
m = pb.Message()
m.type = pb.Message.GET_VALUE
m.key = b"/teia-peer/key"
m.record.key = b"/teia-peer/key"
m.record.value = b"envelope"
p = m.closerPeers.add()
p.id = b"\\x00\\x24" + b"p" * 36
p.addrs.extend([b"\\x04\\x7f\\x00\\x00\\x01", b"\\x29" + b"\\x00" * 16])
p.connection = pb.Message.CANNOT_CONNECT
print(json.dumps({"reencoded": theirs, "made": m.SerializeToString().hex()}))
"""


def test_pylibp2p_reads_and_writes_the_same_bytes() -> None:
    if not Path(PYLIBP2P).exists():
        pytest.fail(f"py-libp2p interpreter {PYLIBP2P} missing: run `make test` (it installs it)")
    ours = [message.encode().hex() for message, _ in KNOWN]
    result = subprocess.run(
        [PYLIBP2P, "-c", _PYLIBP2P_SCRIPT, json.dumps(ours)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    output = json.loads(result.stdout)
    assert output["reencoded"] == ours
    made = Message.decode(bytes.fromhex(output["made"]))
    assert made == Message(
        MessageType.GET_VALUE,
        key=b"/teia-peer/key",
        record=Record(key=b"/teia-peer/key", value=b"envelope"),
        closer_peers=(
            Peer(
                b"\x00\x24" + b"p" * 36,
                (b"\x04\x7f\x00\x00\x01", b"\x29" + b"\x00" * 16),
                ConnectionType.CANNOT_CONNECT,
            ),
        ),
    )
    assert made.encode().hex() == output["made"]
