"""multistream-select: dialer and listener driven against each other in memory."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import ProtocolNegotiationError, ProtocolNotSupported
from teia.host.multistream import (
    MAX_MESSAGE_SIZE,
    MultistreamDialer,
    MultistreamListener,
    ProtocolAgreed,
    encode_message,
)

PING = "/ipfs/ping/1.0.0"
ID = "/ipfs/id/1.0.0"
HEADER = encode_message("/multistream/1.0.0")


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def feed(
    machine: MultistreamDialer | MultistreamListener, data: bytes, chunk: int
) -> ProtocolAgreed | None:
    """Feed ``data`` in pieces; pieces after agreement are the application's, so append them."""
    agreed: ProtocolAgreed | None = None
    for piece in chunks(data, chunk):
        if agreed is None:
            agreed = machine.receive_data(piece)
        else:
            agreed = ProtocolAgreed(agreed.protocol, agreed.unconsumed + piece)
    return agreed


def negotiate(
    dialer: MultistreamDialer,
    listener: MultistreamListener,
    *,
    chunk: int = 1 << 16,
    dialer_app_data: bytes = b"",
    listener_app_data: bytes = b"",
) -> tuple[ProtocolAgreed, ProtocolAgreed]:
    """Pump bytes both ways until both sides agree; the application data rides along."""
    dialer_result: ProtocolAgreed | None = None
    listener_result: ProtocolAgreed | None = None
    # The dialer may pipeline application data right after its (first) proposal.
    to_listener = dialer.data_to_send() + dialer_app_data
    for _ in range(100):
        if listener_result is None:
            listener_result = feed(listener, to_listener, chunk)
        to_dialer = listener.data_to_send()
        if listener_result is not None:
            to_dialer += listener_app_data
        if dialer_result is None:
            dialer_result = feed(dialer, to_dialer, chunk)
        to_listener = dialer.data_to_send()
        if dialer_result is not None and listener_result is not None:
            return dialer_result, listener_result
    raise AssertionError("negotiation did not finish")


def test_first_proposal_agreed_in_one_round_trip() -> None:
    dialer = MultistreamDialer([PING])
    listener = MultistreamListener({PING}.__contains__)
    assert dialer.data_to_send() == HEADER + encode_message(PING)
    assert listener.receive_data(HEADER + encode_message(PING)) == ProtocolAgreed(PING, b"")
    assert listener.data_to_send() == HEADER + encode_message(PING)
    assert dialer.receive_data(HEADER + encode_message(PING)) == ProtocolAgreed(PING, b"")


def test_wire_format_matches_the_spec_example() -> None:
    assert encode_message("na") == bytes.fromhex("036e610a")


def test_falls_back_through_na() -> None:
    dialer = MultistreamDialer(["/teia/x/2.0.0", "/teia/x/1.0.0", PING])
    listener = MultistreamListener({PING, ID}.__contains__)
    agreed_d, agreed_l = negotiate(dialer, listener)
    assert agreed_d.protocol == agreed_l.protocol == PING


def test_nothing_supported_raises_not_supported() -> None:
    dialer = MultistreamDialer(["/a/1", "/b/1"])
    listener = MultistreamListener(lambda _: False)
    with pytest.raises(ProtocolNotSupported, match="/a/1, /b/1"):
        negotiate(dialer, listener)


@given(
    chunk=st.integers(min_value=1, max_value=40),
    dialer_app=st.binary(max_size=50),
    listener_app=st.binary(max_size=50),
    rejected=st.integers(min_value=0, max_value=3),
)
def test_any_chunking_agrees_and_hands_back_application_bytes(
    chunk: int, dialer_app: bytes, listener_app: bytes, rejected: int
) -> None:
    proposals = [f"/nope/{i}" for i in range(rejected)] + [ID]
    dialer = MultistreamDialer(proposals)
    listener = MultistreamListener({ID}.__contains__)
    # Application data may only follow the proposal that is accepted, so pipeline it only then.
    agreed_d, agreed_l = negotiate(
        dialer,
        listener,
        chunk=chunk,
        dialer_app_data=dialer_app if rejected == 0 else b"",
        listener_app_data=listener_app,
    )
    assert agreed_d.protocol == agreed_l.protocol == ID
    assert agreed_l.unconsumed == (dialer_app if rejected == 0 else b"")
    assert agreed_d.unconsumed == listener_app


def test_listener_limits_proposals() -> None:
    listener = MultistreamListener(lambda _: False, max_proposals=3)
    data = HEADER + b"".join(encode_message(f"/p/{i}") for i in range(4))
    with pytest.raises(ProtocolNegotiationError, match="more than 3"):
        listener.receive_data(data)


def test_ls_and_reserved_words_are_answered_na() -> None:
    listener = MultistreamListener(lambda _: True)
    listener.data_to_send()
    assert listener.receive_data(HEADER + encode_message("ls") + encode_message("na")) is None
    assert listener.data_to_send() == encode_message("na") * 2


@pytest.mark.parametrize(
    "side", [lambda: MultistreamDialer([PING]), lambda: MultistreamListener(lambda _: True)]
)
@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encode_message("/multistream/2.0.0"), "does not speak"),
        (b"\x05hello", "not exactly one line"),
        (b"\x03\xff\xfe\n", "not UTF-8"),
        (b"\x03a\nb", "not exactly one line"),
        (b"\x01\n", "empty"),
        (b"\x00", "empty"),
        (b"\x81\x00", "minimal"),
        (b"\x81\x08", "limit"),  # 1025
        (b"\xff\xff\xff", "limit"),
    ],
)
def test_garbage_and_oversize_are_typed_errors(side: object, data: bytes, match: str) -> None:
    machine = side()  # type: ignore[operator]
    with pytest.raises(ProtocolNegotiationError, match=match):
        machine.receive_data(data)


def test_dialer_rejects_an_echo_of_something_else() -> None:
    dialer = MultistreamDialer([PING])
    with pytest.raises(ProtocolNegotiationError, match="expected"):
        dialer.receive_data(HEADER + encode_message(ID))


def test_largest_message_passes_and_encoding_validates() -> None:
    longest = "/" + "x" * (MAX_MESSAGE_SIZE - 2)
    listener = MultistreamListener({longest}.__contains__)
    assert listener.receive_data(HEADER + encode_message(longest)) is not None
    for bad in ["", "a\nb", longest + "x"]:
        with pytest.raises(ProtocolNegotiationError):
            encode_message(bad)


def test_no_input_after_agreement() -> None:
    listener = MultistreamListener({PING}.__contains__)
    listener.receive_data(HEADER + encode_message(PING))
    with pytest.raises(ProtocolNegotiationError, match="finished"):
        listener.receive_data(b"more")


@given(st.binary(max_size=200))
def test_random_input_never_raises_anything_else(data: bytes) -> None:
    for machine in (MultistreamDialer([PING]), MultistreamListener({PING}.__contains__)):
        with contextlib.suppress(ProtocolNegotiationError):
            machine.receive_data(data)
