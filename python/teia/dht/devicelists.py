"""Device lists as DHT values: how anyone finds the devices of an account by its ID alone.

A multi-device account's signed `teia.identity.devicelist.DeviceList` lives in the DHT under
``/teia-devices/ ‖ binary account ID`` (`device_list_key`), stored as its own bytes: the
account key's signature is the proof, as a peer's own signature is for its peer record. A
`DeviceListRecord` is accepted (`DeviceListRecord.decode`) only if, in this order:

- it is at most `MAX_DEVICE_LIST_SIZE` bytes (`OversizeRecord`);
- it parses as a device list (`MalformedRecord`) whose signature verifies against the account
  key it names (`BadRecordSignature`);
- the key, if given, names that account (`RecordKeyMismatch`);
- it was issued at most 5 minutes ahead of ``now`` (`FutureRecord`) and less than
  `DEVICE_LIST_LIFETIME_MS` (7 days) ago (`ExpiredRecord`).

The list's ``version`` is its sequence number (a higher one replaces a lower one; the same
version with other devices is refused as stale). The lifetime bounds how long a superseded
list can be served: a device removed from an account could put the old list that still names
it back on nodes that lack the newer one, but only until that list is 7 days old. The account's
primary re-signs its list (a new version, the same devices) before half the lifetime has gone,
so a live account never drops out; discovery nodes replicate what they hold meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from teia.dht.records import MAX_CLOCK_SKEW_MS, unix_ms
from teia.errors import (
    BadDeviceListSignature,
    BadRecordSignature,
    ExpiredRecord,
    FutureRecord,
    InvalidDeviceList,
    InvalidPeerId,
    MalformedRecord,
    OversizeRecord,
    RecordKeyMismatch,
)
from teia.identity import PeerId
from teia.identity.devicelist import MAX_DEVICE_LIST_SIZE, DeviceList

__all__ = [
    "DEVICE_LIST_KEY_PREFIX",
    "DEVICE_LIST_LIFETIME_MS",
    "DeviceListRecord",
    "account_from_key",
    "device_list_key",
]

DEVICE_LIST_KEY_PREFIX: Final = b"/teia-devices/"
"""DHT keys of device lists: this prefix, then the binary account ID."""
DEVICE_LIST_LIFETIME_MS: Final = 7 * 24 * 60 * 60 * 1000
"""How long after it was issued a device list is kept and served by the DHT."""


def device_list_key(account: PeerId) -> bytes:
    """The DHT key of ``account``'s device list."""
    return DEVICE_LIST_KEY_PREFIX + account.to_bytes()


def account_from_key(key: bytes) -> PeerId:
    """The account a device-list key names; `RecordKeyMismatch` if it names none."""
    if not key.startswith(DEVICE_LIST_KEY_PREFIX):
        raise RecordKeyMismatch(f"{key[:16]!r} is not a device-list key")
    try:
        return PeerId.from_bytes(key[len(DEVICE_LIST_KEY_PREFIX) :])
    except InvalidPeerId:
        raise RecordKeyMismatch("a device-list key that names no account") from None


@dataclass(frozen=True, slots=True)
class DeviceListRecord:
    """A signed device list as a DHT value (see the module docstring for what is accepted)."""

    device_list: DeviceList
    envelope: bytes
    """The list's bytes exactly as signed."""

    @classmethod
    def of(cls, device_list: DeviceList) -> DeviceListRecord:
        """The DHT value of a list in hand (already checked: a `DeviceList` is genuine)."""
        return cls(device_list, device_list.encode())

    @property
    def peer_id(self) -> PeerId:
        """The account ID."""
        return self.device_list.account

    @property
    def seq(self) -> int:
        """The list's version."""
        return self.device_list.version

    @property
    def expires_at_ms(self) -> int:
        """``issued_ms`` plus `DEVICE_LIST_LIFETIME_MS`."""
        return self.device_list.issued_ms + DEVICE_LIST_LIFETIME_MS

    @property
    def key(self) -> bytes:
        """The DHT key: `device_list_key` of the account."""
        return device_list_key(self.peer_id)

    def is_expired(self, at_ms: int) -> bool:
        """Whether the list is past its DHT lifetime at ``at_ms``."""
        return self.expires_at_ms < at_ms

    @classmethod
    def decode(
        cls, data: bytes, *, now_ms: int | None = None, key: bytes | None = None
    ) -> DeviceListRecord:
        """Check a device list offered to the DHT; raises `InvalidRecord` subclasses only.

        ``now_ms`` defaults to the wall clock; with ``key`` the list must be the account's
        that the key names.
        """
        data = bytes(data)
        if len(data) > MAX_DEVICE_LIST_SIZE:
            raise OversizeRecord(f"a device list is at most {MAX_DEVICE_LIST_SIZE} bytes")
        try:
            device_list = DeviceList.decode(data)
        except BadDeviceListSignature as exc:
            raise BadRecordSignature(str(exc)) from None
        except InvalidDeviceList as exc:
            raise MalformedRecord(str(exc)) from None
        record = cls(device_list, data)
        if key is not None and account_from_key(key) != record.peer_id:
            raise RecordKeyMismatch(
                f"the device list of {record.peer_id} is not the one its key names"
            )
        now = unix_ms() if now_ms is None else now_ms
        if device_list.issued_ms > now + MAX_CLOCK_SKEW_MS:
            raise FutureRecord(
                f"device list issued {(device_list.issued_ms - now) // 1000} s in the future; "
                "the signer's clock is wrong"
            )
        if record.is_expired(now):
            raise ExpiredRecord(
                f"device list version {record.seq} expired "
                f"{(now - record.expires_at_ms) // 1000} s ago"
            )
        return record
