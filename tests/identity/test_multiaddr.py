"""Multiaddr text and binary codec."""

from __future__ import annotations

import contextlib
import ipaddress
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import InvalidMultiaddr
from teia.identity import Identity, PeerId
from teia.identity.multiaddr import MAX_MULTIADDR_BYTES, PROTOCOLS, Multiaddr

ED_PEER = "12D3KooWCryG7Mon9orvQxcS1rYZjotPgpwoJNHHKcLLfE4Hf5mV"
SHA_PEER = "QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC"

# multiformats/multiaddr README ("Specification") and test/multiaddr.feature.
SPEC_VECTORS = [
    ("/ip4/127.0.0.1/udp/1234", "047f000001910204d2"),
    ("/ip4/192.0.2.42/tcp/443", "04c000022a0601bb"),
]

# Built by hand from protocols.csv codes (varint code ‖ value), one per protocol we support.
HAND_VECTORS = [
    ("/ip4/127.0.0.1/tcp/4321", "047f0000010610e1"),
    ("/ip6/::1/udp/4001", "29" + "00" * 15 + "01" + "91020fa1"),
    ("/ip4/1.2.3.4/udp/4001/quic", "040102030491020fa1cc03"),
    ("/ip4/1.2.3.4/udp/4001/quic-v1", "040102030491020fa1cd03"),
    ("/dns/example.com/tcp/80", "350b" + b"example.com".hex() + "060050"),
    ("/dns4/a.b/udp/1", "3603" + b"a.b".hex() + "91020001"),
    ("/dns6/a.b/udp/1", "3703" + b"a.b".hex() + "91020001"),
    ("/dnsaddr/bootstrap.libp2p.io", "3813" + b"bootstrap.libp2p.io".hex()),
    (
        f"/p2p/{SHA_PEER}/p2p-circuit",
        "a503" + "22" + PeerId.from_string(SHA_PEER).to_bytes().hex() + "a202",
    ),
    ("/ip4/1.2.3.4/tcp/443/tls/ws", "0401020304" + "0601bb" + "c003" + "dd03"),
]


@pytest.mark.parametrize(("text", "hex_bytes"), SPEC_VECTORS + HAND_VECTORS)
def test_known_answers(text: str, hex_bytes: str) -> None:
    addr = Multiaddr(text)
    assert addr.to_bytes().hex() == hex_bytes
    assert str(Multiaddr.from_bytes(bytes.fromhex(hex_bytes))) == text
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr


def test_components_and_peer_id() -> None:
    addr = Multiaddr(f"/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{ED_PEER}")
    assert addr.components == [
        ("ip4", "127.0.0.1"),
        ("udp", "4001"),
        ("quic-v1", None),
        ("p2p", ED_PEER),
    ]
    assert addr.protocols == ["ip4", "udp", "quic-v1", "p2p"]
    assert addr.value_for("udp") == "4001"
    assert addr.value_for("tcp") is None
    assert addr.peer_id == PeerId.from_string(ED_PEER)
    assert Multiaddr("/ip4/127.0.0.1/udp/1").peer_id is None


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("/ip6/2001:DB8:0:0::1/udp/1", "/ip6/2001:db8::1/udp/1"),
        ("/ip6/0:0:0:0:0:0:0:1/udp/1", "/ip6/::1/udp/1"),
        ("/ip6/::ffff:1.2.3.4/udp/1", "/ip6/::ffff:102:304/udp/1"),
        ("/ip4/1.2.3.4/tcp/0080", "/ip4/1.2.3.4/tcp/80"),
        ("/ip4/1.2.3.4/tcp/80/", "/ip4/1.2.3.4/tcp/80"),
        (f"/ipfs/{SHA_PEER}", f"/p2p/{SHA_PEER}"),
        (
            "/p2p/bafzaajaiaejcalj543iwv2d7pkjt7ykvefrkfu7qjfi6sduakhso4lay6abn2d5u",
            f"/p2p/{ED_PEER}",
        ),
        ("/p2p/k51qzi5uqu5dhb6l8spkdx7yxafegfkee5by8h7lmjh2ehc2sgg34z7c15vzqs", f"/p2p/{ED_PEER}"),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    assert str(Multiaddr(text)) == canonical
    assert Multiaddr(text) == Multiaddr(canonical)


def test_ipv6_uses_ipaddress_normal_form() -> None:
    for text in ("fe80::1", "2001:db8:85a3::8a2e:370:7334", "::", "1:2:3:4:5:6:7:8"):
        addr = Multiaddr(f"/ip6/{text}/udp/1")
        assert addr.value_for("ip6") == str(ipaddress.IPv6Address(text))


# Adapted from go-multiaddr's "construct fails" list, plus our own edge cases.
@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "//",
        "ip4/1.2.3.4",
        "/ip4",
        "/ip4/::1",
        "/ip4/fdpsofodsajfdoisa",
        "/ip4/01.2.3.4",
        "/ip4/1.2.3.4.5",
        "/ip6",
        "/ip6/fe80::1%eth0",
        "/ip6/1.2.3.4",
        "/udp",
        "/tcp",
        "/udp/65536",
        "/tcp/-1",
        "/tcp/+80",
        "/tcp/8 0",
        "/tcp/٨٠",
        "/tcp/123456",
        "/quic-v1/65536",
        "/ip4/127.0.0.1/udp/jfodsajfidosajfoidsa",
        "/ip4/127.0.0.1/udp",
        "/ip4/127.0.0.1/quic-v1/1234",
        "/ip4/127.0.0.1/p2p",
        "/ip4/127.0.0.1/p2p/tcp",
        "/ip4/127.0.0.1/ipfs",
        "/p2p/QmxoHT6iViN5xAjoz1VZ553cL31U9F94ht3QvWR1FrEbZY",
        "/p2p/bafybeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe",
        "/dns/",
        "/dns//tcp/1",
        "/dns/a b/tcp/1",
        "/dns/" + "a" * 256,
        "/unix/a/b",
        "/ip4/1.2.3.4//tcp/1",
        "/ip4/1.2.3.4/tcp/1//",
        "/sctp/1234",
        "/dns/\ud800",
    ],
)
def test_malformed_text(text: str) -> None:
    with pytest.raises(InvalidMultiaddr):
        Multiaddr(text)


@pytest.mark.parametrize(
    "data",
    [
        "",
        "04",
        "047f0000",
        "047f000001910204",
        "0601",
        "80",
        "8000",  # non-minimal varint
        "ffffffffffffffffff01",
        "21",  # code 33 (dccp): unknown to us
        "3500",  # empty dns name
        "3505" + b"a.b".hex(),  # length runs past the end
        "3503" + b"a/b".hex(),
        "3502" + "c328",  # invalid UTF-8
        "a50300",  # empty p2p
        "a50305" + "0103010203",  # p2p value that is not a peer ID
        "a503" + "22" + "13" + "20" + "00" * 32,  # unsupported multihash
    ],
)
def test_malformed_bytes(data: str) -> None:
    with pytest.raises(InvalidMultiaddr):
        Multiaddr.from_bytes(bytes.fromhex(data))


def test_oversize_is_refused() -> None:
    long_text = "/udp/1" * 400
    with pytest.raises(InvalidMultiaddr, match="limit"):
        Multiaddr(long_text)
    long_bytes = bytes.fromhex("91020001") * (MAX_MULTIADDR_BYTES // 4 + 1)
    with pytest.raises(InvalidMultiaddr, match="limit"):
        Multiaddr.from_bytes(long_bytes)
    with pytest.raises(InvalidMultiaddr, match="too long"):
        Multiaddr("/" + "x" * (5 * MAX_MULTIADDR_BYTES))


def test_wrong_input_types() -> None:
    with pytest.raises(InvalidMultiaddr):
        Multiaddr(b"/ip4/1.2.3.4")  # type: ignore[arg-type]
    with pytest.raises(InvalidMultiaddr):
        Multiaddr.from_bytes("047f000001")  # type: ignore[arg-type]


# --- properties ------------------------------------------------------------------------------

_SIMPLE = [p.name for p in PROTOCOLS if p.size == 0]
peer_ids = st.binary(min_size=32, max_size=32).map(lambda seed: Identity.from_seed(seed).peer_id)
dns_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/", min_codepoint=0x21),
    min_size=1,
    max_size=40,
).filter(lambda name: "\x7f" not in name)
components = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"/ip4/{a}"),
    st.ip_addresses(v=6).map(lambda a: f"/ip6/{a}"),
    st.integers(0, 65535).map(lambda p: f"/tcp/{p}"),
    st.integers(0, 65535).map(lambda p: f"/udp/{p}"),
    st.tuples(st.sampled_from(["dns", "dns4", "dns6", "dnsaddr"]), dns_names).map(
        lambda t: f"/{t[0]}/{t[1]}"
    ),
    peer_ids.map(lambda pid: f"/p2p/{pid}"),
    st.sampled_from(_SIMPLE).map(lambda name: f"/{name}"),
)
multiaddrs = st.lists(components, min_size=1, max_size=8).map("".join)


@given(multiaddrs)
def test_round_trip(text: str) -> None:
    addr = Multiaddr(text)
    assert str(addr) == text
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert Multiaddr(str(addr)).to_bytes() == addr.to_bytes()
    assert pickle.loads(pickle.dumps(addr)) == addr
    assert hash(Multiaddr(text)) == hash(addr)


@given(multiaddrs, st.data())
def test_truncation_never_raises_another_error(text: str, data: st.DataObject) -> None:
    raw = Multiaddr(text).to_bytes()
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    try:
        shorter = Multiaddr.from_bytes(raw[:cut])
    except InvalidMultiaddr:
        return
    assert raw.startswith(shorter.to_bytes())


@given(st.binary(max_size=64))
def test_garbage_bytes_raise_only_invalid_multiaddr(data: bytes) -> None:
    try:
        addr = Multiaddr.from_bytes(data)
    except InvalidMultiaddr:
        return
    assert addr.to_bytes() == data


@given(st.text(max_size=64))
def test_garbage_text_raises_only_invalid_multiaddr(text: str) -> None:
    try:
        addr = Multiaddr(text)
    except InvalidMultiaddr:
        return
    assert Multiaddr(str(addr)) == addr


@given(st.lists(st.sampled_from(["ip4", "udp", "p2p", "dns", "quic-v1", "x", ""]), max_size=6))
def test_garbage_protocol_sequences(parts: list[str]) -> None:
    with contextlib.suppress(InvalidMultiaddr):
        Multiaddr("/" + "/".join(parts))


# --- composition and transport helpers ---------------------------------------------------


def test_with_and_without_peer_id() -> None:
    base = Multiaddr("/ip4/10.0.0.1/udp/4001/quic-v1")
    peer = PeerId.from_string(ED_PEER)
    full = base.with_peer_id(peer)
    assert str(full) == f"/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{ED_PEER}"
    assert full.with_peer_id(peer) is full
    assert full.without_peer_id() == base
    assert base.without_peer_id() is base
    with pytest.raises(InvalidMultiaddr, match="already names peer"):
        full.with_peer_id(PeerId.from_string(SHA_PEER))
    with pytest.raises(InvalidMultiaddr, match="empty"):
        Multiaddr(f"/p2p/{ED_PEER}").without_peer_id()


def test_circuit_address_peer_id_is_the_target() -> None:
    relay = Multiaddr(f"/ip4/1.2.3.4/udp/1/quic-v1/p2p/{SHA_PEER}")
    circuit = relay.encapsulate("/p2p-circuit").encapsulate(Multiaddr(f"/p2p/{ED_PEER}"))
    assert str(circuit.peer_id) == ED_PEER
    assert circuit.decapsulate("/p2p-circuit") == relay
    assert circuit.decapsulate("/tcp/1") is circuit
    with pytest.raises(InvalidMultiaddr):
        circuit.decapsulate(circuit)


def test_encapsulate_checks_the_total_size() -> None:
    name = "a" * 250
    addr = Multiaddr(f"/dns/{name}")
    for _ in range(3):  # 4 components of 253 bytes each: 1012 bytes, just under the limit
        addr = addr.encapsulate(f"/dns/{name}")
    with pytest.raises(InvalidMultiaddr, match="limit"):
        addr.encapsulate(f"/dns/{name}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/ip4/127.0.0.1/udp/4001/quic-v1", ("127.0.0.1", 4001)),
        ("/ip6/::1/udp/0", ("::1", 0)),
        (f"/dns/example.com/udp/443/quic-v1/p2p/{ED_PEER}", ("example.com", 443)),
    ],
)
def test_to_udp_address(text: str, expected: tuple[str, int]) -> None:
    assert Multiaddr(text).to_udp_address() == expected


@pytest.mark.parametrize(
    "text", ["/ip4/127.0.0.1/tcp/1", "/udp/1", f"/p2p/{ED_PEER}", "/dnsaddr/x/udp/1"]
)
def test_to_udp_address_refuses_other_shapes(text: str) -> None:
    with pytest.raises(InvalidMultiaddr, match="not a UDP address"):
        Multiaddr(text).to_udp_address()


def test_is_quic_v1() -> None:
    assert Multiaddr("/ip4/1.2.3.4/udp/1/quic-v1").is_quic_v1
    assert Multiaddr(f"/ip6/::1/udp/1/quic-v1/p2p/{ED_PEER}").is_quic_v1
    assert not Multiaddr("/ip4/1.2.3.4/udp/1/quic").is_quic_v1
    assert not Multiaddr("/ip4/1.2.3.4/udp/1").is_quic_v1
    assert not Multiaddr(f"/ip4/1.2.3.4/udp/1/quic-v1/p2p/{SHA_PEER}/p2p-circuit").is_quic_v1


def test_from_udp() -> None:
    peer = PeerId.from_string(ED_PEER)
    assert str(Multiaddr.from_udp("127.0.0.1", 4001)) == "/ip4/127.0.0.1/udp/4001/quic-v1"
    assert str(Multiaddr.from_udp("::1", 1, quic=False)) == "/ip6/::1/udp/1"
    assert str(Multiaddr.from_udp("2001:DB8::1", 2, peer_id=peer)) == (
        f"/ip6/2001:db8::1/udp/2/quic-v1/p2p/{ED_PEER}"
    )
    assert str(Multiaddr.from_udp("relay.example", 3478)) == "/dns/relay.example/udp/3478/quic-v1"
    for host, port in (("127.0.0.1", 65536), ("127.0.0.1", -1), ("fe80::1%eth0", 1), ("a/b", 1)):
        with pytest.raises(InvalidMultiaddr):
            Multiaddr.from_udp(host, port)
    with pytest.raises(InvalidMultiaddr):
        Multiaddr.from_udp("127.0.0.1", True)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_from_udp_round_trips_through_to_udp_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    addr = Multiaddr.from_udp(str(address), port)
    assert addr.to_udp_address() == (str(address), port)
    assert addr.is_quic_v1


def test_immutable_and_equality() -> None:
    addr = Multiaddr("/ip4/1.2.3.4/udp/1")
    with pytest.raises(AttributeError):
        addr._bytes = b""
    assert addr != "/ip4/1.2.3.4/udp/1"
    assert repr(addr) == "Multiaddr('/ip4/1.2.3.4/udp/1')"
