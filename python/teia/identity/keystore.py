"""The identity keystore: one Ed25519 identity in a passphrase-encrypted file.

File format (version 1; all integers big-endian)::

    offset  size  field
    0       8     magic  b"TEIA-KEY"
    8       1     format version (1)
    9       1     KDF id (1 = Argon2id, version 0x13)
    10      4     Argon2id memory cost, KiB
    14      4     Argon2id iterations (time cost)
    18      1     Argon2id lanes (parallelism)
    19      16    salt (random)
    35      12    nonce (random)
    47      84    ChaCha20-Poly1305 ciphertext ‖ tag

The key is Argon2id(passphrase, salt, params) → 32 bytes; the plaintext is the libp2p
``PrivateKey`` protobuf (``seed ‖ public key``, 68 bytes), so the file names its key type and
the public half is checked on load. The whole 47-byte header is the AEAD associated data: a
changed parameter, salt or version fails authentication like a wrong passphrase would. (AEAD
cannot tell a wrong passphrase from a modified ciphertext; both raise `WrongPassphrase`, while
a truncated, oversize or unrecognised file raises `KeystoreError`.)

Files are written atomically with mode 0600 (temporary file in the same directory, fsync,
link or rename, fsync of the directory). Reading **refuses** a keystore that group or others
may access (any of mode bits 0o077), the way ssh refuses such private keys: a key that others
could have copied is not one to keep using silently. Fix it with ``chmod 600 FILE``.

Passphrases are normalised to Unicode NFC before UTF-8 encoding, so the same passphrase typed on
different systems opens the file. Nothing here logs or prints a passphrase or a key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import struct
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from teia.errors import InvalidKeyEncoding, KeystoreError, WrongPassphrase
from teia.identity.keypair import Identity
from teia.identity.keys import decode_private_key

__all__ = [
    "DEFAULT_KDF",
    "KdfParams",
    "decrypt_identity",
    "default_keystore_path",
    "encrypt_identity",
    "load_identity",
    "read_kdf_params",
    "save_identity",
]

MAGIC: Final = b"TEIA-KEY"
FORMAT_VERSION: Final = 1
KDF_ARGON2ID: Final = 1
SALT_SIZE: Final = 16
NONCE_SIZE: Final = 12
_PARAMS = struct.Struct(">BBIIB")  # version, kdf, memory KiB, iterations, lanes
HEADER_SIZE: Final = len(MAGIC) + _PARAMS.size + SALT_SIZE + NONCE_SIZE
_PLAINTEXT_SIZE: Final = 4 + 64  # PrivateKey protobuf: tags, lengths, seed ‖ public
_TAG_SIZE: Final = 16
FILE_SIZE: Final = HEADER_SIZE + _PLAINTEXT_SIZE + _TAG_SIZE

# Bounds on parameters read from a file, so a crafted file cannot make us allocate or spin
# without limit. They also bound what we agree to write.
_MAX_MEMORY_KIB: Final = 4 * 1024 * 1024  # 4 GiB
_MAX_ITERATIONS: Final = 64
_MAX_LANES: Final = 64


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost parameters; they are recorded in the file and read back from it.

    The defaults (64 MiB, 3 iterations, 1 lane) take about a quarter of a second on a current
    machine. Tests pass the minimum (``KdfParams(memory_kib=8, iterations=1)``) to stay fast.
    """

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 1

    def check(self) -> None:
        """Raise `KeystoreError` if the parameters are outside what Argon2id or we accept."""
        if not 1 <= self.lanes <= _MAX_LANES:
            raise KeystoreError(f"Argon2id lanes {self.lanes} outside 1 … {_MAX_LANES}")
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            raise KeystoreError(
                f"Argon2id iterations {self.iterations} outside 1 … {_MAX_ITERATIONS}"
            )
        if not 8 * self.lanes <= self.memory_kib <= _MAX_MEMORY_KIB:
            raise KeystoreError(
                f"Argon2id memory {self.memory_kib} KiB outside {8 * self.lanes} … "
                f"{_MAX_MEMORY_KIB} KiB"
            )


DEFAULT_KDF: Final = KdfParams()


def default_keystore_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the keystore lives unless told otherwise.

    ``$TEIA_HOME/identity.key``, else ``$XDG_DATA_HOME/teia/identity.key``, else
    ``~/.local/share/teia/identity.key``. Empty variables, and a relative ``XDG_DATA_HOME``
    (which the XDG spec says to ignore), are skipped.
    """
    env = os.environ if environ is None else environ
    if teia_home := env.get("TEIA_HOME"):
        return Path(teia_home) / "identity.key"
    xdg = env.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "teia" / "identity.key"
    home = env.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".local" / "share" / "teia" / "identity.key"


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        data = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    elif isinstance(passphrase, bytes | bytearray):
        data = bytes(passphrase)
    else:
        raise TypeError("passphrase must be str or bytes")
    if not data:
        raise KeystoreError("the passphrase is empty")
    return data


def _derive(passphrase: bytes, salt: bytes, kdf: KdfParams) -> bytes:
    return Argon2id(
        salt=salt,
        length=32,
        iterations=kdf.iterations,
        lanes=kdf.lanes,
        memory_cost=kdf.memory_kib,
    ).derive(passphrase)


def encrypt_identity(
    identity: Identity, passphrase: str | bytes, *, kdf: KdfParams = DEFAULT_KDF
) -> bytes:
    """The keystore file contents for ``identity`` under ``passphrase``."""
    kdf.check()
    secret = _passphrase_bytes(passphrase)
    salt, nonce = secrets.token_bytes(SALT_SIZE), secrets.token_bytes(NONCE_SIZE)
    header = (
        MAGIC
        + _PARAMS.pack(FORMAT_VERSION, KDF_ARGON2ID, kdf.memory_kib, kdf.iterations, kdf.lanes)
        + salt
        + nonce
    )
    key = _derive(secret, salt, kdf)
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, identity.to_private_key_protobuf(), header)
    return header + ciphertext


def read_kdf_params(blob: bytes) -> KdfParams:
    """The KDF parameters recorded in keystore contents; raises `KeystoreError` if malformed."""
    if len(blob) < HEADER_SIZE or not blob.startswith(MAGIC):
        raise KeystoreError("not a teia keystore (bad magic or truncated header)")
    version, kdf_id, memory, iterations, lanes = _PARAMS.unpack_from(blob, len(MAGIC))
    if version != FORMAT_VERSION:
        raise KeystoreError(
            f"keystore format version {version} is not supported (this teia reads version "
            f"{FORMAT_VERSION}); upgrade teia"
        )
    if kdf_id != KDF_ARGON2ID:
        raise KeystoreError(f"keystore uses unknown KDF id {kdf_id}")
    kdf = KdfParams(memory_kib=memory, iterations=iterations, lanes=lanes)
    kdf.check()
    return kdf


def decrypt_identity(blob: bytes, passphrase: str | bytes) -> Identity:
    """Open keystore contents; raises `WrongPassphrase` or `KeystoreError`."""
    blob = bytes(blob)
    kdf = read_kdf_params(blob)
    if len(blob) != FILE_SIZE:
        raise KeystoreError(
            f"keystore is {len(blob)} bytes, expected {FILE_SIZE}: truncated or corrupt"
        )
    salt_at = len(MAGIC) + _PARAMS.size
    salt = blob[salt_at : salt_at + SALT_SIZE]
    nonce = blob[salt_at + SALT_SIZE : HEADER_SIZE]
    key = _derive(_passphrase_bytes(passphrase), salt, kdf)
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, blob[HEADER_SIZE:], blob[:HEADER_SIZE])
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase (or the keystore file was modified)") from None
    try:
        return Identity.from_seed(decode_private_key(plaintext))
    except InvalidKeyEncoding as exc:
        raise KeystoreError(f"keystore decrypted but holds no valid key: {exc}") from None


def save_identity(
    identity: Identity,
    path: str | os.PathLike[str],
    passphrase: str | bytes,
    *,
    kdf: KdfParams = DEFAULT_KDF,
    overwrite: bool = False,
) -> Path:
    """Encrypt ``identity`` to ``path`` (mode 0600, atomically); returns the path.

    Refuses to replace an existing file unless ``overwrite``. Missing parent directories are
    created with mode 0700.
    """
    target = Path(path)
    if not overwrite and os.path.lexists(target):
        raise KeystoreError(f"{target} already exists; refusing to overwrite it")
    blob = encrypt_identity(identity, passphrase, kdf=kdf)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeystoreError(
            f"cannot create directory {target.parent}: {exc.strerror or exc}"
        ) from None
    try:
        _write_atomically(target, blob, overwrite=overwrite)
    except FileExistsError:
        raise KeystoreError(f"{target} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeystoreError(f"cannot write keystore {target}: {exc.strerror or exc}") from None
    return target


def _write_atomically(target: Path, data: bytes, *, overwrite: bool) -> None:
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temporary, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(temporary, target)
        else:
            _link_no_clobber(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _fsync_directory(target.parent)


def _link_no_clobber(temporary: Path, target: Path) -> None:
    # A hard link fails if the target exists, so a concurrent `teia init` cannot be clobbered.
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this file system: fall back to check-then-rename.
        if os.path.lexists(target):
            raise FileExistsError(target) from None
        os.replace(temporary, target)


def _fsync_directory(directory: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_identity(path: str | os.PathLike[str], passphrase: str | bytes) -> Identity:
    """Read and decrypt the keystore at ``path``.

    Raises `KeystoreError` if the file is missing, unreadable, accessible by group or others,
    not a regular file, or malformed; `WrongPassphrase` if the passphrase does not open it.
    """
    source = Path(path)
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeystoreError(f"no keystore at {source}; create one with `teia init`") from None
    except OSError as exc:
        raise KeystoreError(f"cannot open keystore {source}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeystoreError(f"keystore {source} is not a regular file")
        if os.name == "posix" and info.st_mode & 0o077:
            raise KeystoreError(
                f"keystore {source} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {source}` "
                "(and consider the key exposed if others could read it)"
            )
        blob = os.read(fd, FILE_SIZE + 1)
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {source}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(blob) > FILE_SIZE:
        raise KeystoreError(f"keystore {source} is larger than any valid keystore")
    try:
        return decrypt_identity(blob, passphrase)
    except WrongPassphrase:
        raise WrongPassphrase(
            f"wrong passphrase for keystore {source} (or the file was modified)"
        ) from None
    except KeystoreError as exc:
        raise KeystoreError(f"keystore {source}: {exc}") from None
