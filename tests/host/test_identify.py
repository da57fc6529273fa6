"""identify: the protobuf codec (strict, bounded) and the exchange between hosts."""

from __future__ import annotations

import contextlib

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import InvalidProtobuf
from teia.host.host import Host
from teia.host.identify import (
    IDENTIFY_PROTOCOL,
    MAX_PROTOCOLS,
    IdentifyInfo,
    request_identify,
)
from teia.host.protobuf import decode_uvarint, encode_bytes_field, encode_uvarint
from teia.identity import Identity, Multiaddr

TIMEOUT = 10

infos = st.builds(
    IdentifyInfo,
    public_key=st.none() | st.binary(max_size=40),
    listen_addrs=st.lists(st.binary(max_size=30), max_size=5).map(tuple),
    protocols=st.lists(st.text(max_size=20), max_size=5).map(tuple),
    observed_addr=st.none() | st.binary(max_size=30),
    protocol_version=st.none() | st.text(max_size=20),
    agent_version=st.none() | st.text(max_size=20),
)


@given(infos)
def test_identify_round_trips(info: IdentifyInfo) -> None:
    assert IdentifyInfo.decode(info.encode()) == info


@given(st.binary(max_size=300))
def test_garbage_is_a_typed_error_or_a_message(data: bytes) -> None:
    with contextlib.suppress(InvalidProtobuf):
        IdentifyInfo.decode(data)


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_varint_round_trips(value: int) -> None:
    encoded = encode_uvarint(value)
    assert decode_uvarint(encoded) == (value, len(encoded))


@pytest.mark.parametrize(
    "data", [b"", b"\x80", b"\x80\x00", b"\xff" * 9 + b"\x01", b"\x81\x80\x00"]
)
def test_bad_varints(data: bytes) -> None:
    with pytest.raises(InvalidProtobuf):
        decode_uvarint(data)


def test_unknown_fields_are_skipped() -> None:
    signed_peer_record = encode_bytes_field(8, b"record")
    varint_field = encode_uvarint(9 << 3) + encode_uvarint(300)
    fixed = encode_uvarint(10 << 3 | 5) + b"\x00" * 4 + encode_uvarint(11 << 3 | 1) + b"\x00" * 8
    data = signed_peer_record + varint_field + fixed + encode_bytes_field(6, b"go-libp2p/0.40")
    info = IdentifyInfo.decode(data)
    assert info.agent_version == "go-libp2p/0.40"
    assert info.unknown_fields == (8, 9, 10, 11)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encode_uvarint(3 << 3) + encode_uvarint(5), "length-delimited"),
        (encode_bytes_field(3, b"\xff\xfe"), "UTF-8"),
        (encode_bytes_field(1, b"abc")[:-1], "past the end"),
        (encode_uvarint(1 << 3 | 3), "wire type"),
        (encode_uvarint(0 << 3 | 2) + b"\x00", "field number 0"),
        (encode_uvarint(12 << 3 | 5) + b"\x00", "past the end"),
        (encode_bytes_field(3, b"/p") * (MAX_PROTOCOLS + 1), "protocols"),
        (encode_bytes_field(2, b"a") * 129, "listen addresses"),
        (b"\x0a" + b"\x00" * (64 * 1024), "over"),
    ],
)
def test_malformed_messages(data: bytes, match: str) -> None:
    with pytest.raises(InvalidProtobuf, match=match):
        IdentifyInfo.decode(data)


def test_quic_v1_multiaddr_known_answers() -> None:
    # quic-v1 is code 0x01cd (461) in the multiaddr table; 0x01cc is the old draft "quic".
    v4 = Multiaddr("/ip4/127.0.0.1/udp/4001/quic-v1").to_bytes()
    assert v4.hex() == "047f00000191020fa1cd03"
    v6 = Multiaddr("/ip6/::1/udp/4001/quic-v1").to_bytes()
    assert v6.hex() == "29" + "00" * 15 + "01" + "91020fa1cd03"
    info = IdentifyInfo(listen_addrs=(v4, b"\xff garbage"), observed_addr=v6)
    assert info.listen_multiaddrs == [Multiaddr("/ip4/127.0.0.1/udp/4001/quic-v1")]
    assert info.observed_multiaddr == Multiaddr("/ip6/::1/udp/4001/quic-v1")


@pytest.mark.anyio
async def test_hosts_identify_each_other() -> None:
    async def noop(stream: object) -> None:
        return None

    with anyio.fail_after(TIMEOUT):
        async with (
            Host(Identity.generate()) as a,
            Host(Identity.generate()) as b,
        ):
            b.set_handler("/teia/custom/1.0.0", noop)
            await a.connect(b.addrs[0])
            info = await a.identify(b.peer_id)
            assert info.public_key is not None
            assert info.public_key == b.identity.public_key_protobuf
            assert set(info.protocols) == {
                "/ipfs/ping/1.0.0",
                IDENTIFY_PROTOCOL,
                "/teia/custom/1.0.0",
            }
            assert info.listen_multiaddrs == b.listen_addrs
            assert info.observed_multiaddr == a.listen_addrs[0]
            assert info.agent_version is not None
            assert info.agent_version.startswith("teia/")
            back = await b.identify(a.peer_id)
            assert back.public_key == a.identity.public_key_protobuf


@pytest.mark.anyio
async def test_unprefixed_responses_are_accepted() -> None:
    message = IdentifyInfo(agent_version="old/1").encode()
    send, receive = anyio.create_memory_object_stream[bytes](4)

    class Reader:
        async def receive(self, max_bytes: int = 65536) -> bytes:
            return await receive.receive()

    async with send, receive:
        await send.send(message)
        send.close()
        info = await request_identify(Reader())  # type: ignore[arg-type]
    assert info.agent_version == "old/1"


@pytest.mark.anyio
async def test_new_connections_are_identified_both_ways() -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            Host(Identity.generate()) as a,
            Host(Identity.generate()) as b,
        ):
            await a.connect(b.addrs[0])
            of_b = await a.wait_identified(b.peer_id)
            of_a = await b.wait_identified(a.peer_id)
            assert of_b is not None
            assert of_a is not None
            assert IDENTIFY_PROTOCOL in of_b.protocols
            assert of_a.listen_multiaddrs == a.listen_addrs
            assert a.peer_info(b.peer_id) == of_b
            assert a.peer_info(a.peer_id) is None
