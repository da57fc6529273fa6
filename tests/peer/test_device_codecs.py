"""Property tests of the multi-device codecs (signed device lists, fanned-out messages, list
pushes, history chunks, link codes) and of the link PAKE's pieces: round trips, and garbage,
truncation, tampering and oversize input refused with the typed errors only."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teia.errors import InvalidDeviceList, InvalidLinkCode, LinkRefused
from teia.identity import Identity, PeerId
from teia.peer.devicewire import (
    KIND_MESSAGE,
    KIND_TRANSCRIPT,
    MAX_DEVICE_LIST_SIZE,
    MAX_DEVICES,
    DeviceList,
    DeviceMessage,
    HistoryChunk,
    HistoryRecord,
    LinkCode,
    ListPush,
    link_pake,
    link_shared,
)
from teia.peer.wire import MAX_APP_DATA, MAX_TEXT_BYTES

ACCOUNT = Identity.from_seed(bytes(range(32)))
DEVICES = [Identity.from_seed(bytes([i]) * 32).peer_id for i in range(1, MAX_DEVICES + 2)]

device_sets = st.lists(st.sampled_from(DEVICES[:MAX_DEVICES]), min_size=1, max_size=MAX_DEVICES)
lists = st.builds(
    lambda devices, version, issued: DeviceList.sign(ACCOUNT, version, devices, issued),
    device_sets,
    st.integers(1, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)
states = st.sampled_from(["pending", "sent", "stored", "delivered", "received", "failed"])
records = st.builds(
    HistoryRecord,
    st.binary(min_size=16, max_size=16),
    st.sampled_from([str(d) for d in DEVICES[:3]]),
    st.text(max_size=40),
    st.booleans(),
    st.integers(0, 2**64 - 1),
    states,
    st.sampled_from([None, "direct", "relayed", "stored"]),
    st.text(max_size=300),
)


def decoders() -> list[object]:
    return [
        DeviceList.decode,
        DeviceMessage.decode,
        ListPush.decode,
        HistoryChunk.decode,
    ]


@given(lists)
def test_device_list_round_trip(device_list: DeviceList) -> None:
    encoded = device_list.encode()
    assert len(encoded) <= MAX_DEVICE_LIST_SIZE
    decoded = DeviceList.decode(encoded)
    assert decoded == device_list
    assert decoded.account == Identity.from_seed(bytes(range(32))).peer_id
    assert list(decoded.devices) == sorted(set(decoded.devices), key=PeerId.to_bytes)


@given(lists, st.data())
def test_device_list_truncated_or_tampered_is_refused(
    device_list: DeviceList, data: st.DataObject
) -> None:
    encoded = device_list.encode()
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(InvalidDeviceList):
        DeviceList.decode(encoded[:cut])
    with pytest.raises(InvalidDeviceList):
        DeviceList.decode(encoded + data.draw(st.binary(min_size=1, max_size=8)))
    at = data.draw(st.integers(0, len(encoded) - 1))
    flipped = bytearray(encoded)
    flipped[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(InvalidDeviceList):
        DeviceList.decode(bytes(flipped))


def test_device_list_signed_by_another_key_is_refused() -> None:
    genuine = DeviceList.sign(ACCOUNT, 2, DEVICES[:2])
    forger = Identity.generate()
    forged = DeviceList.sign(forger, 3, DEVICES[:3])
    # The forger's list claiming the genuine account key: the signature is not that key's.
    claimed = ACCOUNT.public_key + forged.encode()[4 + 32 :]
    with pytest.raises(InvalidDeviceList):
        DeviceList.decode(forged.encode()[:4] + claimed)
    assert DeviceList.decode(genuine.encode()) == genuine


def test_device_list_bounds() -> None:
    with pytest.raises(Exception, match="1 to 16"):
        DeviceList.sign(ACCOUNT, 1, DEVICES[: MAX_DEVICES + 1])
    with pytest.raises(Exception, match="1 to 16"):
        DeviceList.sign(ACCOUNT, 1, [])
    with pytest.raises(Exception, match="version"):
        DeviceList.sign(ACCOUNT, 0, DEVICES[:1])
    with pytest.raises(InvalidDeviceList, match="oversize"):
        DeviceList.decode(bytes(MAX_DEVICE_LIST_SIZE + 1))


@given(st.binary(max_size=2048))
def test_garbage_only_raises_typed_errors(data: bytes) -> None:
    for decode in decoders():
        with contextlib.suppress(InvalidDeviceList):
            decode(data)  # type: ignore[operator]
    with contextlib.suppress(InvalidLinkCode):
        LinkCode.parse(data.decode("latin-1"))


@given(
    st.sampled_from([KIND_MESSAGE, KIND_TRANSCRIPT]),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=32, max_size=32),
    lists,
    st.text(max_size=500),
    st.data(),
)
def test_device_message_round_trip_and_truncation(
    kind: int,
    message_id: bytes,
    sent_ms: int,
    peer: bytes,
    device_list: DeviceList,
    text: str,
    data: st.DataObject,
) -> None:
    message = DeviceMessage(kind, message_id, sent_ms, peer, device_list, text)
    encoded = message.encode()
    assert DeviceMessage.decode(encoded) == message
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(InvalidDeviceList):
        DeviceMessage.decode(encoded[:cut])
    with pytest.raises(InvalidDeviceList):
        DeviceMessage.decode(encoded + b"\x00")


def test_device_message_biggest_fits_an_app_payload() -> None:
    biggest = DeviceMessage(
        KIND_MESSAGE,
        bytes(16),
        0,
        bytes(32),
        DeviceList.sign(ACCOUNT, 1, DEVICES[:MAX_DEVICES]),
        "x" * MAX_TEXT_BYTES,
    )
    assert len(biggest.encode()) <= MAX_APP_DATA
    with pytest.raises(Exception, match="at most"):
        DeviceMessage(
            KIND_MESSAGE, bytes(16), 0, bytes(32), biggest.device_list, "xx" * MAX_TEXT_BYTES
        ).encode()


@given(st.booleans(), lists)
def test_list_push_round_trip(reply: bool, device_list: DeviceList) -> None:
    push = ListPush(reply, device_list)
    assert ListPush.decode(push.encode()) == push
    with pytest.raises(InvalidDeviceList):
        ListPush.decode(push.encode()[:-1])


@given(st.booleans(), st.lists(records, max_size=8), st.data())
def test_history_chunk_round_trip_and_truncation(
    last: bool, items: list[HistoryRecord], data: st.DataObject
) -> None:
    chunk = HistoryChunk(last, tuple(items))
    encoded = chunk.encode()
    assert HistoryChunk.decode(encoded) == chunk
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(InvalidDeviceList):
        HistoryChunk.decode(encoded[:cut])


@given(
    st.binary(min_size=5, max_size=5),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(0, 65535),
)
def test_link_code_round_trip(secret: bytes, host: str, port: int) -> None:
    code = LinkCode(secret, host, port)
    text = code.format()
    assert len(text.replace("-", "")) in (20, 39)
    assert LinkCode.parse(text) == code
    assert LinkCode.parse(text.lower().replace("-", " ")) == code


def test_link_code_typos_are_caught_locally() -> None:
    text = LinkCode(b"\x01\x02\x03\x04\x05", "127.0.0.1", 40000).format()
    assert len(text) == 24  # 20 characters in five groups of four
    typo = ("1" if text[0] != "1" else "2") + text[1:]
    with pytest.raises(InvalidLinkCode):
        LinkCode.parse(typo)
    with pytest.raises(InvalidLinkCode):
        LinkCode.parse(text[:-1])
    with pytest.raises(InvalidLinkCode):
        LinkCode.parse(text + "0")
    with pytest.raises(InvalidLinkCode):
        LinkCode.parse(text.replace(text[5], "U"))


@settings(max_examples=50)
@given(st.binary(min_size=5, max_size=5), st.binary(min_size=16, max_size=16))
def test_the_link_pake_agrees_only_on_the_same_secret_devices_and_nonce(
    secret: bytes, nonce: bytes
) -> None:
    a, b = DEVICES[0], DEVICES[1]
    new, existing = link_pake(secret, a, b, nonce), link_pake(secret, a, b, nonce)
    assert len(new.share) == 32
    assert new.share != existing.share  # fresh scalars
    agreed = link_shared(new, existing.share)
    assert agreed == link_shared(existing, new.share)
    other_secret = bytes(5) if secret != bytes(5) else b"\x01" * 5
    other_nonce = bytes(16) if nonce != bytes(16) else b"\x01" * 16
    for other in (
        link_pake(other_secret, a, b, nonce),
        link_pake(secret, b, a, nonce),
        link_pake(secret, a, DEVICES[2], nonce),
        link_pake(secret, a, b, other_nonce),
    ):
        assert link_shared(new, other.share) != link_shared(other, new.share)


def test_the_link_pake_refuses_invalid_shares() -> None:
    run = link_pake(b"12345", DEVICES[0], DEVICES[1], bytes(16))
    for bad in (b"", bytes(31), bytes(32), b"\xff" * 32, run.share):
        with pytest.raises(LinkRefused):
            link_shared(run, bad)
