"""Type stubs for teia's Rust extension (checked with ``python -m mypy.stubtest teia._native``).

Errors raised are the classes of :mod:`teia.errors` (``InvalidKey``, ``InvalidSignature``,
``InvalidMessage``, ``DecryptionError``, ``DuplicateMessage``, ``TooManySkippedMessages``,
``InvalidSessionState``). Wire formats and parameters: ``docs/crypto.md``.
"""

from collections.abc import Sequence
from typing import final

__version__: str
__all__ = [
    "CpaceState",
    "GroupReceiverKey",
    "GroupSenderKey",
    "KadLookup",
    "KadRoutingTable",
    "OneTimePrekey",
    "PrekeyBundle",
    "PrekeyMessageInfo",
    "RatchetState",
    "RelayDataPlane",
    "Session",
    "SignedPrekey",
    "__version__",
    "argon2id",
    "ed25519_public_key",
    "ed25519_public_to_x25519",
    "ed25519_seed_to_x25519",
    "ed25519_sign",
    "ed25519_verify",
    "is_prekey_message",
    "kad_distance",
    "kad_key",
    "kdf_ck",
    "kdf_rk",
    "message_key_material",
    "open_sealed",
    "parse_prekey_message",
    "seal",
    "search_tokens",
    "x3dh_associated_data",
    "x3dh_initiate",
    "x3dh_respond",
    "x25519_keypair",
    "x25519_public_key",
]

# --- primitives, exposed for known-answer tests and interoperability -----------------------

def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as ``(private, public)``, 32 bytes each."""

def x25519_public_key(private_key: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""

def ed25519_public_to_x25519(public_key: bytes) -> bytes:
    """Birational map of an Ed25519 public key to its X25519 (Montgomery u) form."""

def ed25519_seed_to_x25519(seed: bytes) -> bytes:
    """The X25519 private key of an Ed25519 seed: SHA-512(seed)[:32] (clamped on use)."""

def ed25519_public_key(seed: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte seed."""

def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message`` under a 32-byte seed."""

def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``
    (strict: a malformed or small-order key, or a malleable signature, is not valid)."""

def argon2id(
    password: bytes, salt: bytes, memory_kib: int, iterations: int, lanes: int, length: int
) -> bytes:
    """Argon2id (RFC 9106, version 0x13) of ``password`` and ``salt``; runs without the GIL."""

def kdf_rk(root_key: bytes, dh_output: bytes) -> tuple[bytes, bytes]:
    """KDF_RK → ``(new_root_key, chain_key)``."""

def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """KDF_CK → ``(next_chain_key, message_key)``."""

def message_key_material(message_key: bytes) -> tuple[bytes, bytes, bytes]:
    """ENCRYPT's expansion of a message key → ``(aes_key, hmac_key, iv)``."""

def seal(message_key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ENCRYPT: AES-256-CBC/PKCS#7 ciphertext with the 32-byte HMAC-SHA256 tag appended."""

def open_sealed(message_key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """DECRYPT, the inverse of :func:`seal`."""

def x3dh_initiate(identity_seed: bytes, ephemeral_private: bytes, bundle: PrekeyBundle) -> bytes:
    """X3DH as the initiator with an explicit ephemeral key → the 32-byte shared secret SK.

    Verifies the bundle's signed-prekey signature first.
    """

def x3dh_respond(
    identity_seed: bytes,
    signed_prekey_private: bytes,
    one_time_prekey_private: bytes | None,
    initiator_identity_key: bytes,
    initiator_ephemeral_key: bytes,
) -> bytes:
    """X3DH as the responder → the 32-byte shared secret SK."""

def search_tokens(key: bytes, words: list[str]) -> list[bytes]:
    """HMAC-SHA256(key, word)[:16] of each word (UTF-8), in order: the peer's search tokens."""

def x3dh_associated_data(initiator_identity_key: bytes, responder_identity_key: bytes) -> bytes:
    """AD = IK_A ‖ IK_B (the raw 32-byte Ed25519 public keys)."""

# --- the Double Ratchet, low level (takes SK, AD and the responder's ratchet key directly) ---

@final
class RatchetState:
    """Double Ratchet state of one side of a conversation."""

    @staticmethod
    def init_initiator(
        shared_secret: bytes,
        associated_data: bytes,
        remote_ratchet_public: bytes,
        ratchet_private: bytes | None = None,
    ) -> RatchetState:
        """RatchetInitAlice; ``ratchet_private`` fixes the first sending ratchet key (tests)."""

    @staticmethod
    def init_responder(
        shared_secret: bytes, associated_data: bytes, ratchet_private: bytes
    ) -> RatchetState:
        """RatchetInitBob with the responder's ratchet key pair (its signed prekey)."""

    def encrypt(self, plaintext: bytes) -> bytes:
        """RatchetEncrypt → ``header ‖ ciphertext ‖ tag``."""

    def decrypt(self, message: bytes) -> bytes:
        """RatchetDecrypt; transactional: on any error the state is unchanged."""

    def to_bytes(self) -> bytes:
        """Versioned serialisation (contains secrets: the caller encrypts it at rest)."""

    @staticmethod
    def from_bytes(data: bytes) -> RatchetState:
        """Inverse of :meth:`to_bytes`; raises ``InvalidSessionState``."""

    @property
    def ratchet_public_key(self) -> bytes:
        """The current sending ratchet public key."""

    @property
    def skipped_message_keys(self) -> int:
        """How many skipped message keys are stored."""

    @property
    def associated_data(self) -> bytes:
        """The session AD."""

# --- X3DH key material and sessions, high level --------------------------------------------

@final
class PrekeyBundle:
    """What a responder publishes so that others can start sessions with it."""

    def __new__(
        cls,
        identity_key: bytes,
        signed_prekey_id: int,
        signed_prekey: bytes,
        signed_prekey_signature: bytes,
        one_time_prekey_id: int | None = None,
        one_time_prekey: bytes | None = None,
    ) -> PrekeyBundle: ...
    @property
    def identity_key(self) -> bytes: ...
    @property
    def signed_prekey_id(self) -> int: ...
    @property
    def signed_prekey(self) -> bytes: ...
    @property
    def signed_prekey_signature(self) -> bytes: ...
    @property
    def one_time_prekey_id(self) -> int | None: ...
    @property
    def one_time_prekey(self) -> bytes | None: ...
    def verify(self) -> None:
        """Raises ``InvalidSignature`` unless the identity key signed the signed prekey."""

    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> PrekeyBundle: ...

@final
class SignedPrekey:
    """A signed prekey with its private half (secret; encrypt at rest)."""

    @staticmethod
    def generate(identity_seed: bytes, prekey_id: int) -> SignedPrekey: ...
    @property
    def id(self) -> int: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def private_key(self) -> bytes: ...
    @property
    def signature(self) -> bytes: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> SignedPrekey: ...

@final
class OneTimePrekey:
    """A one-time prekey with its private half (secret; encrypt at rest)."""

    @staticmethod
    def generate(prekey_id: int) -> OneTimePrekey: ...
    @property
    def id(self) -> int: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def private_key(self) -> bytes: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> OneTimePrekey: ...

@final
class PrekeyMessageInfo:
    """The clear fields of an initial (prekey) message, so the responder can find its keys."""

    @property
    def identity_key(self) -> bytes: ...
    @property
    def base_key(self) -> bytes: ...
    @property
    def signed_prekey_id(self) -> int: ...
    @property
    def one_time_prekey_id(self) -> int | None: ...

def parse_prekey_message(message: bytes) -> PrekeyMessageInfo:
    """Parse the clear part of a prekey message; raises ``InvalidMessage``."""

def is_prekey_message(message: bytes) -> bool:
    """Whether a session message is an initial (prekey) message."""

@final
class Session:
    """A pairwise session: X3DH to start, then the Double Ratchet."""

    @staticmethod
    def initiate(identity_seed: bytes, bundle: PrekeyBundle) -> Session:
        """Start a session from the responder's bundle (verified first)."""

    @staticmethod
    def accept(
        identity_seed: bytes,
        signed_prekey: SignedPrekey,
        one_time_prekey: OneTimePrekey | None,
        message: bytes,
    ) -> tuple[Session, bytes]:
        """Accept an initial message → ``(session, plaintext)``."""

    def encrypt(self, plaintext: bytes) -> bytes:
        """A session message (a prekey message until the peer has answered)."""

    def decrypt(self, message: bytes) -> bytes:
        """Decrypt a session message; transactional: on any error the state is unchanged."""

    @property
    def local_identity_key(self) -> bytes: ...
    @property
    def remote_identity_key(self) -> bytes: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> Session: ...
    def copy(self) -> Session:
        """An independent copy, without parsing the state again."""
    def __copy__(self) -> Session: ...

# --- sender keys for groups -----------------------------------------------------------------

@final
class GroupSenderKey:
    """One member's sending chain in one group (secret; encrypt at rest)."""

    @staticmethod
    def generate(chain_id: int | None = None) -> GroupSenderKey: ...
    @property
    def chain_id(self) -> int: ...
    @property
    def iteration(self) -> int: ...
    @property
    def signing_public_key(self) -> bytes: ...
    def encrypt(self, plaintext: bytes) -> bytes:
        """A signed group message."""

    def distribution_message(self) -> bytes:
        """The message that hands this chain (from its current iteration) to a member."""

    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> GroupSenderKey: ...

@final
class GroupReceiverKey:
    """A member's copy of another member's sending chain."""

    @staticmethod
    def from_distribution_message(message: bytes) -> GroupReceiverKey: ...
    @property
    def chain_id(self) -> int: ...
    @property
    def signing_public_key(self) -> bytes: ...
    def decrypt(self, message: bytes) -> bytes:
        """Verify and decrypt a group message; transactional."""

    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> GroupReceiverKey: ...

# --- PAKE for linking devices ------------------------------------------------------------------

@final
class CpaceState:
    """One side of one CPace-style PAKE run over ristretto255 (the scalar stays in Rust,
    zeroized on drop)."""

    def __new__(cls, transcript: bytes) -> CpaceState:
        """Generator hashed from ``transcript`` (SHA-512, ristretto255 hash-to-group), fresh
        random scalar."""

    @property
    def share(self) -> bytes:
        """The share to send (32 bytes)."""

    def finish(self, theirs: bytes) -> bytes:
        """The shared secret; `InvalidKey` for a share that does not decode, is our own, or
        gives the identity."""

# --- Kademlia ---------------------------------------------------------------------------------
# Peer IDs and addresses are opaque bytes; keys are 32 bytes (SHA-256, see kad_key); times are
# non-negative integers of milliseconds on the caller's clock. A wrong key length, bad IP text or
# a negative number raises ValueError. Objects are not for concurrent use from several threads
# (a second call while one runs raises RuntimeError).

def kad_key(data: bytes) -> bytes:
    """SHA-256 of peer ID bytes or a record key: its 32-byte Kademlia key."""

def kad_distance(a: bytes, b: bytes) -> bytes:
    """XOR of two 32-byte keys, big-endian (compare as bytes: smaller is closer)."""

@final
class KadRoutingTable:
    """256 k-buckets around the local peer: least-recently-seen order, ping-before-evict, and
    per-network-prefix limits against eclipse attacks."""

    def __new__(
        cls,
        local_peer_id: bytes,
        *,
        k: int = 20,
        bucket_prefix_limit: int = 2,
        table_prefix_limit: int = 10,
        max_addrs: int = 16,
    ) -> KadRoutingTable: ...
    def insert(
        self, peer_id: bytes, addrs: list[bytes], now_ms: int, ip: str | None = None
    ) -> tuple[str, bytes | None]:
        """Add or refresh a contact seen alive at ``now_ms``.

        ``("inserted", None)`` or ``("updated", None)``; ``("pending", oldest_peer_id)`` when
        the bucket is full: ping that peer, then call `ping_ok` or `ping_failed` (the same
        candidate inserted again names the same peer); ``("refused:<reason>", None)`` with
        reason ``local-key``, ``bucket-prefix-limit``, ``table-prefix-limit`` or
        ``bucket-full`` (a ping is already outstanding in that bucket).

        ``ip``: the address the peer was observed on (its /24 or /48 counts for the prefix
        limits); None exempts the entry (configured bootstrap nodes).
        """

    def ping_ok(self, peer_id: bytes, now_ms: int) -> bool:
        """The pinged entry answered: it stays, its waiting candidate is dropped. False if it
        is not in the table."""

    def ping_failed(self, peer_id: bytes) -> bytes | None:
        """The pinged entry did not answer: it is evicted; returns the peer ID of the waiting
        candidate that took its place, if any."""

    def remove(self, peer_id: bytes) -> bool:
        """Drop an entry (a waiting candidate of its bucket moves in); False if unknown."""

    def contains(self, peer_id: bytes) -> bool: ...
    def get(self, peer_id: bytes) -> tuple[list[bytes], int] | None:
        """``(addrs, last_seen_ms)``, or None if unknown."""

    def closest(self, target_key: bytes, n: int) -> list[tuple[bytes, list[bytes]]]:
        """Up to ``n`` ``(peer_id, addrs)`` closest to the 32-byte ``target_key``, nearest
        first."""

    def entries(self) -> list[tuple[bytes, list[bytes], int]]:
        """Every ``(peer_id, addrs, last_seen_ms)``, for persistence."""

    def refresh_targets(self, now_ms: int, max_age_ms: int) -> list[bytes]:
        """A random 32-byte key in each bucket not refreshed for ``max_age_ms``: look each one
        up, then call `mark_refreshed`."""

    def mark_refreshed(self, target_key: bytes, now_ms: int) -> None:
        """A lookup for ``target_key`` ran at ``now_ms``: its bucket is fresh."""

    def __len__(self) -> int: ...

@final
class KadLookup:
    """One iterative FIND_NODE lookup, sans-IO: `poll` says whom to ask and until when to wait;
    report each request's outcome with `on_response` or `on_failure`."""

    def __new__(
        cls,
        target_key: bytes,
        seeds: list[tuple[bytes, list[bytes]]],
        *,
        local_peer_id: bytes | None = None,
        k: int = 20,
        alpha: int = 3,
        request_timeout_ms: int = 10_000,
        max_requests: int = 200,
    ) -> KadLookup: ...
    def poll(self, now_ms: int) -> tuple[str, object]:
        """``("send", (peer_id, addrs))``: ask that peer; ``("wait", until_ms)``: poll again at
        that time or after a response/failure; ``("done", None)``: see `results`."""

    def on_response(self, peer_id: bytes, closer_peers: list[tuple[bytes, list[bytes]]]) -> bool:
        """``peer_id`` answered; False if the answer was ignored (not asked, a duplicate, or
        the lookup is over)."""

    def on_failure(self, peer_id: bytes) -> bool:
        """The request to ``peer_id`` failed; False if none was outstanding."""

    @property
    def is_done(self) -> bool: ...
    def results(self) -> list[tuple[bytes, list[bytes]]]:
        """The k closest peers that answered, nearest first."""

    def unresponsive(self) -> list[bytes]:
        """Peer IDs that failed or timed out (without a late answer)."""

    def stats(self) -> dict[str, int]:
        """Counters: requests, responses, late_responses, failures, timeouts,
        ignored_responses."""

# --- TURN relay data plane ------------------------------------------------------------------
# Linux only (epoll, recvmmsg/sendmmsg). Hosts are IP literals (no DNS); times are milliseconds
# on the data plane's monotonic clock. Bad IP text, a negative number, an out-of-range port or
# channel, an unknown allocation or a closed data plane raise ValueError; the operating system's
# refusals (binding, an exhausted relay port range, sending) raise OSError.

@final
class RelayDataPlane:
    """The TURN data plane (RFC 8656): owns the client-facing UDP socket and one relayed UDP
    socket per allocation, and forwards ChannelData, Send and Data indications on its own
    thread without the GIL. Other STUN messages go up through :meth:`recv_control`.

    Forwarding needs a live permission for the peer IP (and, for ChannelData, a live channel),
    and a peer on one of the relay's own addresses (``own_ips``) must be a live relayed
    allocation of this data plane (the kernel delivers to it locally); everything else is
    dropped and counted in :meth:`stats` under ``dropped_<reason>``
    (``malformed``, ``no_allocation``, ``unknown_channel``, ``no_permission``,
    ``forbidden_peer``, ``quota``, ``control_queue_full``, ``tcp_queue_full``,
    ``send_error``)."""

    def __new__(
        cls,
        host: str,
        port: int = 0,
        *,
        relay_ip: str | None = None,
        relay_port_min: int = 0,
        relay_port_max: int = 0,
        control_queue: int = 4096,
        own_ips: Sequence[str] | None = None,
        udp_gso: bool = True,
    ) -> RelayDataPlane:
        """Bind ``host:port`` for clients and start the worker. Relayed sockets bind
        ``relay_ip`` (default ``host``) on a port in ``relay_port_min..relay_port_max``
        (inclusive; 0 and 0: the OS chooses). ``control_queue`` bounds the queue of STUN
        messages waiting for :meth:`recv_control` (and, apart, of TCP-client data).
        ``own_ips``: the relay's own addresses, at which peers may be only live relayed
        allocations, never another port (an unspecified address also stands for loopback);
        default: ``relay_ip`` and ``host``; ``[]`` when the operator allow-lists them.
        ``udp_gso``: send runs of equal-sized datagrams to one address as one UDP GSO buffer
        (the kernel cuts it back into those datagrams); it turns itself off if refused."""

    @property
    def port(self) -> int:
        """The bound client-facing port."""

    def recv_control(self, timeout_ms: int) -> list[tuple[bytes, str, int]]:
        """STUN messages for the control plane as ``(datagram, client_host, client_port)``:
        waits up to ``timeout_ms`` with the GIL released; ``[]`` on timeout or once closed."""

    def waiting_receivers(self) -> int:
        """Threads blocked in :meth:`recv_control` or :meth:`recv_relayed_for_tcp` now."""

    def recv_relayed_for_tcp(self, timeout_ms: int) -> list[tuple[bytes, str, int]]:
        """Peer data for allocations made with ``tcp=True``, already framed for the client's
        TCP stream (ChannelData padded to 4 bytes when a channel is bound, else a Data
        indication), as ``(message, client_host, client_port)``."""

    def send_to_client(self, data: bytes, host: str, port: int) -> None:
        """Send a control-plane response to a client from the listening socket."""

    def allocate(
        self, client_host: str, client_port: int, *, bytes_per_second: int = 0, tcp: bool = False
    ) -> tuple[str, int]:
        """Open the relayed socket for a client; returns the relayed ``(ip, port)``.
        ``bytes_per_second`` limits each direction (0: unlimited). ``tcp=True``: the client
        uses a TCP control connection; its peer data goes to :meth:`recv_relayed_for_tcp`
        and its traffic to peers comes through :meth:`send_from_relay`. ValueError if the
        client has an allocation."""

    def release(self, client_host: str, client_port: int) -> bool:
        """Close the client's relayed socket; False if it had none."""

    def add_permission(
        self, client_host: str, client_port: int, peer_ip: str, lifetime_ms: int
    ) -> None:
        """Install or refresh the permission for ``peer_ip`` (any port) for ``lifetime_ms``;
        0 removes it."""

    def bind_channel(
        self,
        client_host: str,
        client_port: int,
        channel: int,
        peer_host: str,
        peer_port: int,
        lifetime_ms: int,
    ) -> None:
        """Bind or refresh ``channel`` (0x4000-0x4FFF) to the peer for ``lifetime_ms``; also
        installs or extends the peer IP's permission (to at most 300 s). ValueError if the
        number or the peer is bound elsewhere (or was, less than 5 minutes ago), or the peer is
        the relay's own listening address."""

    def set_quota(self, client_host: str, client_port: int, bytes_per_second: int) -> None:
        """Change the allocation's byte rate, each direction (0: unlimited)."""

    def send_from_relay(
        self, client_host: str, client_port: int, peer_host: str, peer_port: int, data: bytes
    ) -> bool:
        """Send ``data`` from the client's relayed socket to the peer (for TCP-transport
        clients); the same permission and quota checks as the UDP path. False when dropped
        (counted)."""

    def allocation_stats(self) -> list[dict[str, object]]:
        """Per allocation: ``client`` and ``relayed`` as ``(host, port)``, ``tcp``,
        ``bytes_per_second``, ``permissions``, ``channels``, ``packets_to_peers``,
        ``bytes_to_peers``, ``packets_to_client``, ``bytes_to_client`` (payload bytes),
        ``drops`` (``{reason: count}``), ``created_ms`` and ``last_activity_ms`` (Unix
        epoch)."""

    def stats(self) -> dict[str, int]:
        """Global counters: ``client_datagrams``, ``client_bytes``, ``peer_datagrams``,
        ``peer_bytes``, ``control_messages``, ``control_replies``, ``tcp_messages``,
        ``allocations``, ``allocations_created``, ``allocations_released``,
        ``packets_to_peers``, ``bytes_to_peers``, ``packets_to_clients``,
        ``bytes_to_clients``, ``dropped_<reason>`` for each reason and ``dropped`` (their
        sum)."""

    def close(self) -> None:
        """Stop the worker (within about 50 ms) and close every socket; idempotent."""
