"""Typed errors for all of teia.

Every error says what was wrong and, where it helps, what to do. Errors never carry message
content, keys or tokens.
"""

from __future__ import annotations


class TeiaError(Exception):
    """Base class of every error teia raises on purpose."""


# --- general --------------------------------------------------------------------------------


class InvalidVarint(TeiaError, ValueError):
    """An unsigned varint that is truncated, longer than 9 bytes or not minimally encoded.

    Also raised when asked to encode a negative value or one of 2**63 or more.
    """


# --- identity -------------------------------------------------------------------------------


class IdentityError(TeiaError):
    """A problem with an identity, a peer ID or an address."""


class InvalidPeerId(IdentityError, ValueError):
    """A peer ID string or byte form that does not parse, or uses an unsupported key type."""


class InvalidKeyEncoding(IdentityError, ValueError):
    """A key of the wrong size, or a libp2p key protobuf that is malformed or not canonical."""


class InvalidMultiaddr(IdentityError, ValueError):
    """A multiaddr that does not parse (text or binary form), or an unsupported protocol."""


class KeystoreError(IdentityError):
    """A keystore file that is missing, unreadable, corrupt or of an unknown version."""


class WrongPassphrase(KeystoreError):
    """The passphrase does not open this keystore."""


# --- crypto ---------------------------------------------------------------------------------


class CryptoError(TeiaError):
    """Base class of errors from the end-to-end encryption core."""


class InvalidKey(CryptoError, ValueError):
    """A key of the wrong length, or a public key that is low-order / non-contributory."""


class InvalidSignature(CryptoError):
    """A signature that does not verify under the claimed key."""


class InvalidMessage(CryptoError, ValueError):
    """A message that is truncated, oversize or malformed before any decryption is attempted."""


class DecryptionError(CryptoError):
    """A message that fails authentication (forged, corrupted, or for another session).

    The session state is left exactly as it was before the call.
    """


class DuplicateMessage(DecryptionError):
    """A message whose key was already used: a replay, or a duplicate delivery."""


class TooManySkippedMessages(DecryptionError):
    """A message that would skip more message keys than the chain allows (1000)."""


class InvalidSessionState(CryptoError, ValueError):
    """Serialised session or key state that is corrupt or of an unsupported version."""


class UntrustedIdentity(CryptoError):
    """A contact's identity key changed; the change must be surfaced and confirmed."""


# --- transport ------------------------------------------------------------------------------


class TransportError(TeiaError):
    """A problem with a connection, its handshake or a stream on it."""


class InvalidCertificate(TransportError, ValueError):
    """A peer's libp2p TLS certificate that fails verification.

    Missing or malformed libp2p public-key extension, bad self-signature or host-key signature,
    outside its validity window, a chain of more than one certificate, or a critical extension we
    do not understand. The connection attempt is aborted; nothing from that peer is trusted.
    """


class InvalidSignedKey(InvalidCertificate):
    """The DER SignedKey in the libp2p extension, or the host key inside it, is malformed."""


class UnsupportedKeyType(InvalidCertificate):
    """The peer's host key is of a type teia does not accept (only Ed25519 host keys are)."""


class PeerIdMismatch(TransportError):
    """The remote peer proved a different peer ID from the one we dialed (`/p2p/<id>`).

    Either the address is stale (another peer now listens there) or someone is intercepting.
    """


class HandshakeFailed(TransportError):
    """The QUIC/TLS handshake did not complete (refused, timed out, or the peer aborted it)."""


class ConnectionClosed(TransportError):
    """The connection was closed (locally, by the peer, or by an idle timeout)."""


class StreamReset(TransportError):
    """The peer (or we) reset the stream; data in flight may be lost."""


class ProtocolNegotiationError(TransportError):
    """multistream-select failed: malformed or oversize message, or an unexpected reply."""


class ProtocolNotSupported(ProtocolNegotiationError):
    """The remote side declined every protocol we proposed (`na`)."""


class PingFailed(TransportError):
    """The peer answered a ping (``/ipfs/ping/1.0.0``) with other bytes than it was sent."""


class ConnectionLimitExceeded(TransportError):
    """A connection was refused because a connection-manager limit is reached.

    Raise the limit in `ConnectionLimits` if the node really should hold more connections.
    """


class NotConnected(TransportError):
    """No open connection to that peer; connect to one of its addresses first."""


class InvalidProtobuf(TransportError, ValueError):
    """A protobuf message from a peer that is truncated, oversize or malformed."""


class MessageTooLarge(TransportError, ValueError):
    """A length-prefixed message on a stream is over the reader's limit (or its prefix is bad)."""


class HolePunchError(TransportError):
    """No direct connection came out of a hole-punching attempt; the relayed one stays in use.

    Expected behind symmetric NATs and strict firewalls: the conversation goes on through the
    relay, and another attempt is made later (`teia.host.holepunch`).
    """


class InvalidHolePunchMessage(HolePunchError, ValueError):
    """A hole-punch signalling message that is malformed, oversize, carries too many or unusable
    candidate addresses, or arrives out of order; the attempt is abandoned."""


# --- services -------------------------------------------------------------------------------


class ConfigError(TeiaError, ValueError):
    """A configuration file or flag that does not parse, names an unknown key, or is invalid."""


# --- discovery ------------------------------------------------------------------------------


class DhtError(TeiaError):
    """Base class of errors from the Kademlia DHT: its messages, peer records and storage."""


class InvalidDhtMessage(DhtError, ValueError):
    """A kad-dht protobuf message that is truncated, oversize, malformed or over a limit.

    Drop the message (and reset the stream); the peer that sent it is misbehaving or broken.
    """


class InvalidRecord(DhtError, ValueError):
    """A signed peer record that must not be stored or used; `reason` says why, in one word.

    Each reason has its own subclass, so callers can catch one case or all of them.
    """

    reason = "invalid"


class MalformedRecord(InvalidRecord):
    """A record or envelope that does not parse, misses a required field or breaks a rule."""

    reason = "malformed"


class OversizeRecord(InvalidRecord):
    """A record over a size or count limit (envelope bytes, addresses, protocols, strings)."""

    reason = "oversize"


class BadRecordSignature(InvalidRecord):
    """An envelope whose signature does not verify (forged, corrupted, or another domain)."""

    reason = "bad-signature"


class WrongRecordSigner(InvalidRecord):
    """A record signed by a key that is not the record's peer (or not an Ed25519 key)."""

    reason = "wrong-signer"


class RecordKeyMismatch(InvalidRecord):
    """A record stored or fetched under a DHT key that does not name the record's peer."""

    reason = "key-mismatch"


class StaleRecord(InvalidRecord):
    """A record whose sequence number does not beat the one already held for that peer."""

    reason = "stale-sequence"


class ExpiredRecord(InvalidRecord):
    """A record whose ``issued_at + ttl`` is in the past; its owner must publish a new one."""

    reason = "expired"


class FutureRecord(InvalidRecord):
    """A record issued further in the future than the allowed clock skew (5 minutes)."""

    reason = "future-dated"


class DhtStoreError(DhtError):
    """The DHT's SQLite store is unusable: corrupt, of an unknown schema version, or closed.

    A corrupt file must be moved aside (the node rebuilds its table and records from the
    network); a newer schema version needs a newer teia.
    """


class DhtQuotaExceeded(DhtError):
    """A DHT store limit is reached (records, providers per key or routing entries).

    Nothing was written. Expired entries are purged periodically; raise the limit if the node
    really should hold more.
    """


# --- relay ----------------------------------------------------------------------------------


class RelayError(TeiaError):
    """A problem in the STUN/TURN relay (its wire format, configuration or data plane)."""


class InvalidStunMessage(RelayError, ValueError):
    """Bytes that are not a well-formed STUN message or ChannelData frame, or that break a
    limit (size, attribute count, attribute length, a FINGERPRINT that does not match).

    Drop the datagram (RFC 8489 says so: no error response to malformed input); on a TCP
    connection, close it, since the framing is lost.
    """


class RelayCapacityError(RelayError):
    """The data plane could not create a relayed socket (ports exhausted, bind failed).

    The client gets 508 (Insufficient Capacity); widen the relay port range or add relays.
    """


class RelayUnavailable(RelayError, TransportError):
    """No relay allocation to send through: no relay is configured
    (``Host(relays=[RelayClientConfig(…)])``), or every configured relay is unreachable or
    refused the allocation (its ``last_error`` says why); or the allocation ended mid-dial.
    """


class RelayRefused(RelayError, TransportError):
    """A relay answered a TURN request with an error; ``code`` is the STUN error code
    (403: the relay's policy forbids that peer; 486/508: quotas or capacity)."""

    code = 0

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


# --- store ----------------------------------------------------------------------------------


class StoreError(TeiaError):
    """Base class of errors from the store-and-forward nodes (issue 6)."""


class InvalidStoreMessage(StoreError, ValueError):
    """A ``/teia/store/1.0.0`` message that is truncated, oversize, malformed or over a limit.

    A node answers it with a ``BAD_REQUEST`` (or ``TOO_LARGE``) status and keeps serving; a
    client that receives one from a node treats the node as broken for that request.
    """


class StoreDatabaseError(StoreError):
    """The store's SQLite file is unusable: corrupt, of an unknown schema version, or closed.

    Move a corrupt file aside (replicas hold copies; anti-entropy refills the node); a newer
    schema version needs a newer teia.
    """


class StoreRequestRefused(StoreError):
    """A store node refused a request; ``status`` is the wire status code (see
    `teia.store.messages.Status`) and the message is the node's explanation."""

    status = 0

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class StoreAuthError(StoreRequestRefused):
    """An owner operation whose signature is forged, made with a key that does not hash to the
    inbox, outside the ±60 s clock window, or a replay. Sign a fresh operation (and check the
    clock) before retrying."""


class StoreQuotaExceeded(StoreRequestRefused):
    """A deposit over the inbox's quota (envelopes or bytes) or the node's disk quota.

    Nothing was stored. The recipient must fetch and acknowledge first, or the operator raise
    the quota.
    """


class StoreRateLimited(StoreRequestRefused):
    """Too many requests from this peer; wait before sending more."""


class StoreUnavailable(StoreError):
    """Too few store nodes answered: a replicated write did not reach W acknowledgements, or no
    node responsible for an inbox could be read. Retry later; the payload was not lost if the
    caller still holds it."""


# --- peer -----------------------------------------------------------------------------------


class PeerError(TeiaError):
    """A problem in the peer: its profile, a contact, a conversation or a delivery."""


class ProfileError(PeerError):
    """A peer profile that is missing, unreadable, corrupt, or already exists.

    Create one with ``teia init --profile DIR`` (or `teia.peer.Profile.create`).
    """


class ProfileInUse(ProfileError):
    """Another process has this profile online (``teia peer run``, a bot, ``teia chat``).

    One process at a time keeps a profile's sessions; others may read history and queue
    messages into the outbox, which the online process delivers.
    """


class InvalidChatMessage(PeerError, ValueError):
    """A chat envelope, acknowledgement, plaintext or sealed payload that does not parse, is
    oversize, or is not for us. Nothing was stored and no session changed."""


class UnknownContact(PeerError, LookupError):
    """A contact name that is not in the address book; add it with ``teia contacts add``."""


class ContactIdentityChanged(PeerError):
    """The contact's name now points at another identity key than the one seen before.

    Compare safety numbers with the contact, then ``teia contacts verify NAME`` (or
    `Peer.contacts.verify`) before sending to it by name again.
    """


class DeliveryError(PeerError):
    """A message could not be handed over by any path right now; it stays in the outbox."""


class DeviceError(PeerError):
    """A multi-device operation that cannot be done: this device has no account yet (create
    or link one), is not the account's primary (only it holds the account key), was removed
    from its account, or was asked something that makes no sense (sending to its own account,
    removing itself)."""


class InvalidDeviceList(DeviceError, ValueError):
    """A signed device list, or a device payload carrying one, that is truncated, oversize,
    malformed, lists too many devices, or whose signature is not the account key's. Refused;
    nothing was stored."""


class BadDeviceListSignature(InvalidDeviceList):
    """A device list whose signature is not its account key's (forged or corrupted)."""


class StaleDeviceList(DeviceError):
    """A device list whose version is lower than the one held for that account (or equal with
    other devices): a replay of an old list. The newer list stays."""


class DeviceNotListed(DeviceError):
    """A payload from a device that is not on its account's current device list (a removed
    device, or one claiming an account it does not belong to). Refused."""


class UnknownAccount(DeviceError, LookupError):
    """No device list is known for that account: introduce one of its devices first
    (`Devices.introduce`) and wait for the answer (`Devices.wait_account`)."""


class LinkError(DeviceError):
    """Linking a new device failed; nothing changed on either device."""


class InvalidLinkCode(LinkError, ValueError):
    """A link code that does not parse or whose check character is wrong: a typo. Type the
    code shown on the existing device again (nothing was sent)."""


class LinkRefused(LinkError):
    """The existing device refused the link, or its answer did not prove the code: a wrong
    code (or someone in the middle), an expired or already used code, or too many attempts.
    Show a new code on the existing device and try again."""


class AttachmentError(PeerError):
    """A problem with a file transfer (`teia.peer.attachments`): sending, serving or receiving."""


class InvalidAttachmentMessage(AttachmentError, ValueError):
    """A file offer, chunk, request or answer that does not parse, is oversize or out of
    range. Nothing was written."""


class AttachmentTooLarge(AttachmentError, ValueError):
    """A file over the size limit (`teia.peer.attachments.MAX_FILE_SIZE`); split it first."""


class AttachmentUnavailable(AttachmentError):
    """The sender does not serve this file to us (never offered to us, finished or expired);
    the transfer retries later and fails once the offer expires."""


class AttachmentCorrupted(AttachmentError):
    """File data that fails authentication (a tampered or damaged chunk, or a finished file
    whose digest does not match). It is never written to the final file; it is fetched again."""


class UnknownAttachment(AttachmentError, LookupError):
    """No transfer with this file ID in the profile; ``teia file list`` shows the known ones."""


class GroupError(PeerError):
    """A problem with a group: its membership chain, its keys or its messages."""


class InvalidGroupMessage(GroupError, ValueError):
    """A group state, key distribution or group message that does not parse, is oversize, is
    not canonical, or whose signature does not verify. Nothing was stored."""


class GroupChangeRefused(GroupError):
    """A membership or name change that does not extend the group's chain: not signed by an
    admin of the state before it, a wrong previous hash or version (forged, replayed, forked).
    The group stays as it was."""


class NotGroupMember(GroupError):
    """A group message or key from a peer that is not a member (or for a group we are not
    in); or a local change asked of a peer that is not an admin of the group."""


class UnknownGroup(GroupError, LookupError):
    """No group with this ID in the profile; ``teia group list`` shows the known ones."""


# --- homeserver -----------------------------------------------------------------------------


class HomeserverError(TeiaError):
    """Base class of errors from homeserver-lite (issue 10)."""


class MatrixError(HomeserverError):
    """A request refused in Matrix form: ``errcode`` (``M_FORBIDDEN``, ``M_BAD_JSON`` …), the
    HTTP ``status`` and a message for the client. Never carries tokens or message content."""

    def __init__(self, status: int, errcode: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.extra = extra


class HomeserverDatabaseError(HomeserverError):
    """The homeserver's database is unusable: unreachable (PostgreSQL), of an unknown schema
    version, or corrupt. Check ``--database`` and that one homeserver process uses it."""


class FederationError(HomeserverError):
    """A federation request to or from another homeserver failed: unreachable, refused, or
    answered with something that does not verify (bad signature, bad hash, wrong origin)."""
