"""Signed device lists: which devices speak for a multi-device account.

An **account** is an Ed25519 key; its ID is the peer-ID form of the public key (`account_id`).
The account key signs a `DeviceList` naming the account's devices (each an Ed25519 peer ID).
The codec lives here, below the peer and the DHT, because both read it: peers exchange lists
over their sessions (`teia.peer.devices`), and discovery nodes hold them as DHT values
(`teia.dht.devicelists`). Decoding is strict and bounded and checks the signature; anything
else raises `InvalidDeviceList` (`BadDeviceListSignature` for a signature that does not verify).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from teia.errors import BadDeviceListSignature, DeviceError, InvalidDeviceList, InvalidPeerId
from teia.identity.keypair import Identity
from teia.identity.keys import verify
from teia.identity.peer_id import PeerId

__all__ = [
    "MAX_DEVICES",
    "MAX_DEVICE_LIST_SIZE",
    "DeviceList",
    "Reader",
    "account_id",
    "device_id",
]

MAX_DEVICES: Final = 16
_MAX_PEER_ID: Final = 64
_LIST_MAGIC: Final = b"TDL\x01"
_LIST_DOMAIN: Final = b"teia device list v1\x00"
_SIGNATURE: Final = 64
_KEY: Final = 32
MAX_DEVICE_LIST_SIZE: Final = 4 + _KEY + 8 + 8 + 1 + MAX_DEVICES * (1 + _MAX_PEER_ID) + _SIGNATURE


def account_id(account_key: bytes) -> PeerId:
    """The account ID of an account public key (its peer-ID form)."""
    return PeerId.from_public_key(account_key)


class Reader:
    """Reads a byte string front to back; every shortfall is `InvalidDeviceList`.

    Shared with the device payload codecs of `teia.peer.devicewire`."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = bytes(data)
        self._at = 0
        self._what = what

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes."""
        if self._at + size > len(self._data):
            raise InvalidDeviceList(f"{self._what} is truncated")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def uint(self, size: int) -> int:
        """The next ``size`` bytes as a big-endian unsigned integer."""
        return int.from_bytes(self.take(size), "big")

    def end(self) -> None:
        """Refuse anything left unread."""
        if self._at != len(self._data):
            raise InvalidDeviceList(f"{self._what} has trailing bytes")


def device_id(raw: bytes, what: str) -> PeerId:
    """A device ID read from ``what``: an Ed25519 peer ID, else `InvalidDeviceList`."""
    try:
        device = PeerId.from_bytes(raw)
    except InvalidPeerId:
        raise InvalidDeviceList(f"{what} holds a device ID that does not parse") from None
    if device.public_key is None:
        raise InvalidDeviceList(f"{what} holds a device ID that is not an Ed25519 key")
    return device


@dataclass(frozen=True, slots=True)
class DeviceList:
    """An account's devices, signed by the account key. Build one with `sign`; `decode` checks
    the signature, so a `DeviceList` in hand is always genuine.

    Encoding (integers big-endian)::

        "TDL" 0x01 ‖ account key (32) ‖ version (8) ‖ issued_ms (8) ‖ count (1, 1 to 16)
        ‖ count * (length (1, ≤ 64) ‖ device peer ID bytes)   strictly ascending, no repeats
        ‖ Ed25519 signature (64) over "teia device list v1" 0x00 ‖ everything before it
    """

    account_key: bytes
    version: int
    issued_ms: int
    devices: tuple[PeerId, ...]
    signature: bytes

    @property
    def account(self) -> PeerId:
        """The account ID."""
        return account_id(self.account_key)

    def __contains__(self, device: object) -> bool:
        return device in self.devices

    @staticmethod
    def _body(account_key: bytes, version: int, issued_ms: int, devices: Sequence[PeerId]) -> bytes:
        out = bytearray(_LIST_MAGIC)
        out += account_key + version.to_bytes(8, "big") + issued_ms.to_bytes(8, "big")
        out.append(len(devices))
        for device in devices:
            raw = device.to_bytes()
            out.append(len(raw))
            out += raw
        return bytes(out)

    @classmethod
    def sign(
        cls,
        account: Identity,
        version: int,
        devices: Sequence[PeerId],
        issued_ms: int | None = None,
    ) -> DeviceList:
        """A list of ``devices`` (1 to 16 distinct Ed25519 peer IDs) at ``version`` (≥ 1)."""
        ordered = tuple(sorted(set(devices), key=PeerId.to_bytes))
        if not 1 <= len(ordered) <= MAX_DEVICES:
            raise DeviceError(f"an account lists 1 to {MAX_DEVICES} devices, not {len(ordered)}")
        for device in ordered:
            if device.public_key is None or len(device.to_bytes()) > _MAX_PEER_ID:
                raise DeviceError(f"{device} is not an Ed25519 device ID")
        if not 1 <= version < 2**64:
            raise DeviceError("a device list version is a positive 64-bit number")
        issued = int(time.time() * 1000) if issued_ms is None else issued_ms
        body = cls._body(account.public_key, version, issued, ordered)
        return cls(account.public_key, version, issued, ordered, account.sign(_LIST_DOMAIN + body))

    def encode(self) -> bytes:
        """The signed list's bytes (at most `MAX_DEVICE_LIST_SIZE`)."""
        body = self._body(self.account_key, self.version, self.issued_ms, self.devices)
        return body + self.signature

    @classmethod
    def decode(cls, data: bytes) -> DeviceList:
        """Parse and check a signed list; `InvalidDeviceList` if anything is off, the
        signature included."""
        if len(data) > MAX_DEVICE_LIST_SIZE:
            raise InvalidDeviceList("a device list is oversize")
        reader = Reader(data, "a device list")
        if reader.take(4) != _LIST_MAGIC:
            raise InvalidDeviceList("not a device list (bad magic or version)")
        account_key = reader.take(_KEY)
        version = reader.uint(8)
        issued_ms = reader.uint(8)
        count = reader.uint(1)
        if not 1 <= count <= MAX_DEVICES or version < 1:
            raise InvalidDeviceList(
                f"a device list has 1 to {MAX_DEVICES} devices and a version ≥ 1"
            )
        devices: list[PeerId] = []
        for _ in range(count):
            size = reader.uint(1)
            if size > _MAX_PEER_ID:
                raise InvalidDeviceList("a device ID in a device list is oversize")
            raw = reader.take(size)
            if devices and raw <= devices[-1].to_bytes():
                raise InvalidDeviceList("a device list's devices are not strictly ascending")
            devices.append(device_id(raw, "a device list"))
        signature = reader.take(_SIGNATURE)
        reader.end()
        signed = bytes(data[: len(data) - _SIGNATURE])
        if not verify(account_key, _LIST_DOMAIN + signed, signature):
            raise BadDeviceListSignature("a device list's signature is not its account key's")
        return cls(account_key, version, issued_ms, tuple(devices), signature)
