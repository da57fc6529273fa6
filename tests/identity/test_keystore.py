"""The encrypted identity keystore: format, permissions, atomic writes, failure modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teia.errors import KeystoreError, WrongPassphrase
from teia.identity import Identity, keystore
from teia.identity.keystore import (
    FILE_SIZE,
    HEADER_SIZE,
    KdfParams,
    decrypt_identity,
    default_keystore_path,
    encrypt_identity,
    load_identity,
    read_kdf_params,
    save_identity,
)

FAST = KdfParams(memory_kib=8, iterations=1, lanes=1)
PASS = "correct horse battery staple"


@pytest.fixture
def identity() -> Identity:
    return Identity.from_seed(bytes(range(32)))


def test_round_trip(tmp_path: Path, identity: Identity) -> None:
    path = save_identity(identity, tmp_path / "id.key", PASS, kdf=FAST)
    assert load_identity(path, PASS) == identity
    assert load_identity(path, PASS).private_seed == identity.private_seed


def test_file_mode_is_0600_whatever_the_umask(tmp_path: Path, identity: Identity) -> None:
    old = os.umask(0o000)
    try:
        path = save_identity(identity, tmp_path / "a" / "b" / "id.key", PASS, kdf=FAST)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["id.key"]  # no temporary left behind


def test_format_header_and_recorded_params(identity: Identity) -> None:
    params = KdfParams(memory_kib=16, iterations=2, lanes=2)
    blob = encrypt_identity(identity, PASS, kdf=params)
    assert len(blob) == FILE_SIZE == HEADER_SIZE + 68 + 16
    assert blob.startswith(b"TEIA-KEY\x01\x01")
    assert read_kdf_params(blob) == params
    assert decrypt_identity(blob, PASS) == identity
    # fresh salt and nonce every time
    assert encrypt_identity(identity, PASS, kdf=params)[19:47] != blob[19:47]


def test_default_params_are_the_documented_ones(identity: Identity) -> None:
    assert KdfParams(memory_kib=65536, iterations=3, lanes=1) == keystore.DEFAULT_KDF


def test_wrong_passphrase(tmp_path: Path, identity: Identity) -> None:
    path = save_identity(identity, tmp_path / "id.key", PASS, kdf=FAST)
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        load_identity(path, PASS + "!")
    assert issubclass(WrongPassphrase, KeystoreError)


def test_passphrase_is_nfc_normalised(identity: Identity) -> None:
    blob = encrypt_identity(identity, "caf\u00e9", kdf=FAST)
    assert decrypt_identity(blob, "cafe\u0301") == identity
    assert decrypt_identity(blob, "caf\u00e9".encode()) == identity


def test_empty_passphrase_is_refused(identity: Identity) -> None:
    with pytest.raises(KeystoreError, match="empty"):
        encrypt_identity(identity, "", kdf=FAST)


def test_every_header_field_is_authenticated(identity: Identity) -> None:
    blob = encrypt_identity(identity, PASS, kdf=FAST)
    # Bytes 8..18 are version, KDF id and params (checked by parsing); salt and nonce are
    # only caught by authentication. Flip one bit in each byte of each.
    for index in range(19, FILE_SIZE):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(WrongPassphrase):
            decrypt_identity(bytes(tampered), PASS)


def test_changed_params_fail_authentication(identity: Identity) -> None:
    blob = bytearray(encrypt_identity(identity, PASS, kdf=FAST))
    blob[17] = 2  # iterations 1 -> 2: valid parameters, but not the ones the key was made with
    with pytest.raises(WrongPassphrase):
        decrypt_identity(bytes(blob), PASS)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:0], "not a teia keystore"),
        (lambda b: b[: HEADER_SIZE - 1], "not a teia keystore"),
        (lambda b: b"XEIA-KEY" + b[8:], "not a teia keystore"),
        (lambda b: b[:8] + b"\x02" + b[9:], "version 2 is not supported"),
        (lambda b: b[:9] + b"\x07" + b[10:], "unknown KDF"),
        (lambda b: b[:10] + b"\x00\x00\x00\x04" + b[14:], "memory"),
        (lambda b: b[:10] + b"\xff\xff\xff\xff" + b[14:], "memory"),
        (lambda b: b[:14] + b"\x00\x00\x00\x00" + b[18:], "iterations"),
        (lambda b: b[:14] + b"\x00\x01\x00\x00" + b[18:], "iterations"),
        (lambda b: b[:18] + b"\x00" + b[19:], "lanes"),
        (lambda b: b[:-1], "truncated or corrupt"),
        (lambda b: b + b"\0", "truncated or corrupt"),
        (lambda b: b[:HEADER_SIZE], "truncated or corrupt"),
    ],
)
def test_corrupt_files(identity: Identity, mutate: object, message: str) -> None:
    blob = encrypt_identity(identity, PASS, kdf=FAST)
    with pytest.raises(KeystoreError, match=message) as info:
        decrypt_identity(mutate(blob), PASS)  # type: ignore[operator]
    assert not isinstance(info.value, WrongPassphrase)


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=FILE_SIZE + 8))
def test_garbage_raises_only_keystore_errors(identity: Identity, data: bytes) -> None:
    with pytest.raises(KeystoreError):
        decrypt_identity(data, PASS)


def test_refuses_to_overwrite(tmp_path: Path, identity: Identity) -> None:
    path = save_identity(identity, tmp_path / "id.key", PASS, kdf=FAST)
    other = Identity.generate()
    with pytest.raises(KeystoreError, match="already exists"):
        save_identity(other, path, PASS, kdf=FAST)
    assert load_identity(path, PASS) == identity
    save_identity(other, path, PASS, kdf=FAST, overwrite=True)
    assert load_identity(path, PASS) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.key"]


def test_refuses_to_overwrite_a_dangling_symlink(tmp_path: Path, identity: Identity) -> None:
    link = tmp_path / "id.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeystoreError, match="already exists"):
        save_identity(identity, link, PASS, kdf=FAST)
    assert not (tmp_path / "elsewhere").exists()


def test_lost_race_does_not_clobber(
    tmp_path: Path, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "id.key"
    real_encrypt = keystore.encrypt_identity

    def encrypt_then_lose_race(*args: object, **kwargs: object) -> bytes:
        blob = real_encrypt(*args, **kwargs)  # type: ignore[arg-type]
        path.write_bytes(b"written by someone else meanwhile")
        return blob

    monkeypatch.setattr(keystore, "encrypt_identity", encrypt_then_lose_race)
    with pytest.raises(KeystoreError, match="already exists"):
        save_identity(identity, path, PASS, kdf=FAST)
    assert path.read_bytes() == b"written by someone else meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666, 0o700])
def test_refuses_group_or_world_accessible_files(
    tmp_path: Path, identity: Identity, mode: int
) -> None:
    path = save_identity(identity, tmp_path / "id.key", PASS, kdf=FAST)
    path.chmod(mode)
    if mode & 0o077:
        with pytest.raises(KeystoreError, match="chmod 600"):
            load_identity(path, PASS)
    else:
        assert load_identity(path, PASS) == identity


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="teia init"):
        load_identity(tmp_path / "nope.key", PASS)
    with pytest.raises(KeystoreError, match="not a regular file"):
        load_identity(tmp_path, PASS)


def test_oversize_file(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "big.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, encrypt_identity(identity, PASS, kdf=FAST) + b"\0" * 4096)
    os.close(fd)
    with pytest.raises(KeystoreError, match="larger than any valid keystore"):
        load_identity(path, PASS)


def test_parent_is_a_file(tmp_path: Path, identity: Identity) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(KeystoreError, match="cannot create directory"):
        save_identity(identity, tmp_path / "file" / "id.key", PASS, kdf=FAST)


def test_unwritable_directory(tmp_path: Path, identity: Identity) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(KeystoreError, match="cannot write keystore"):
        save_identity(identity, locked / "id.key", PASS, kdf=FAST)


@pytest.mark.parametrize(
    "params",
    [
        KdfParams(memory_kib=7),
        KdfParams(memory_kib=8, lanes=2),
        KdfParams(iterations=0),
        KdfParams(iterations=65),
        KdfParams(lanes=0),
        KdfParams(memory_kib=5 * 1024 * 1024),
    ],
)
def test_out_of_range_params_are_refused(identity: Identity, params: KdfParams) -> None:
    with pytest.raises(KeystoreError, match="Argon2id"):
        encrypt_identity(identity, PASS, kdf=params)


def test_default_path(tmp_path: Path) -> None:
    assert default_keystore_path({"TEIA_HOME": "/t", "XDG_DATA_HOME": "/x", "HOME": "/h"}) == (
        Path("/t/identity.key")
    )
    assert default_keystore_path({"XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path(
        "/x/teia/identity.key"
    )
    assert default_keystore_path({"TEIA_HOME": "", "XDG_DATA_HOME": "rel", "HOME": "/h"}) == (
        Path("/h/.local/share/teia/identity.key")
    )
    assert default_keystore_path({"HOME": "/h"}) == Path("/h/.local/share/teia/identity.key")


def test_default_path_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEIA_HOME", "/somewhere")
    assert default_keystore_path() == Path("/somewhere/identity.key")
