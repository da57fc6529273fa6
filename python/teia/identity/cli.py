"""``teia init`` (create the encrypted identity keystore) and ``teia id`` (print the peer ID).

The passphrase comes from, in order: ``--passphrase-file FILE`` (its first line), the
``TEIA_PASSPHRASE`` environment variable, or an interactive prompt when stdin is a terminal
(asked twice by ``init``). Without any of them the command fails with a message saying so:
a daemon must never hang on a prompt nobody sees. Passphrases and keys are never printed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from teia.errors import KeystoreError
from teia.identity import keystore
from teia.identity.keypair import Identity

__all__ = ["register", "run_id", "run_init"]

PASSPHRASE_ENV = "TEIA_PASSPHRASE"  # noqa: S105 -- the variable's name, not a secret
_MAX_PASSPHRASE_FILE = 64 * 1024


def register(sub: Any) -> None:
    """Register ``teia init`` and ``teia id`` on the top-level subparsers."""
    keystore_help = (
        "keystore file (default: $TEIA_HOME/identity.key, $XDG_DATA_HOME/teia/identity.key "
        "or ~/.local/share/teia/identity.key)"
    )
    passphrase_help = (
        f"read the passphrase from the first line of FILE (default: ${PASSPHRASE_ENV}, "
        "else a prompt if stdin is a terminal)"
    )

    init = sub.add_parser(
        "init",
        help="create a new identity in an encrypted keystore",
        description="Generate an Ed25519 identity and store it encrypted with a passphrase "
        "(Argon2id + ChaCha20-Poly1305, file mode 0600). Prints the new peer ID.",
    )
    init.add_argument("--keystore", type=Path, metavar="PATH", help=keystore_help)
    init.add_argument(
        "--force",
        action="store_true",
        help="replace an existing keystore (the identity in it is lost for good)",
    )
    init.add_argument("--passphrase-file", type=Path, metavar="FILE", help=passphrase_help)
    init.set_defaults(handler=run_init)

    show = sub.add_parser(
        "id",
        help="print this node's peer ID",
        description="Open the keystore and print the peer ID (base58btc, 12D3KooW…).",
    )
    show.add_argument("--keystore", type=Path, metavar="PATH", help=keystore_help)
    show.add_argument("--cid", action="store_true", help="print the CIDv1 form (bafz…) instead")
    show.add_argument("--passphrase-file", type=Path, metavar="FILE", help=passphrase_help)
    show.set_defaults(handler=run_id)


def run_init(args: argparse.Namespace) -> int:
    """``teia init``: create the keystore; prints the peer ID."""
    path: Path = args.keystore or keystore.default_keystore_path()
    if not args.force and os.path.lexists(path):
        raise KeystoreError(f"{path} already exists; pass --force to replace it")
    passphrase = _passphrase(args, what=f"new keystore {path}", confirm=True)
    identity = Identity.generate()
    keystore.save_identity(
        identity, path, passphrase, kdf=keystore.DEFAULT_KDF, overwrite=args.force
    )
    print(f"created {path}", file=sys.stderr)
    print(identity.peer_id)
    return 0


def run_id(args: argparse.Namespace) -> int:
    """``teia id``: print the peer ID of the keystore's identity."""
    path: Path = args.keystore or keystore.default_keystore_path()
    if not os.path.lexists(path):
        raise KeystoreError(f"no keystore at {path}; create one with `teia init`")
    identity = keystore.load_identity(path, _passphrase(args, what=f"keystore {path}"))
    print(identity.peer_id.to_cid() if args.cid else identity.peer_id)
    return 0


def _passphrase(args: argparse.Namespace, *, what: str, confirm: bool = False) -> str:
    if args.passphrase_file is not None:
        return _read_passphrase_file(args.passphrase_file)
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env is not None:
        if not from_env:
            raise KeystoreError(f"{PASSPHRASE_ENV} is set but empty")
        return from_env
    if not sys.stdin.isatty():
        raise KeystoreError(
            f"no passphrase: set {PASSPHRASE_ENV}, pass --passphrase-file FILE, "
            "or run in a terminal to be prompted"
        )
    try:
        passphrase = getpass.getpass(f"Passphrase for {what}: ")
        if not passphrase:
            raise KeystoreError("the passphrase is empty")
        if confirm and getpass.getpass("Repeat the passphrase: ") != passphrase:
            raise KeystoreError("the passphrases do not match")
    except EOFError:
        raise KeystoreError("no passphrase entered") from None
    return passphrase


def _read_passphrase_file(path: Path) -> str:
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_PASSPHRASE_FILE + 1)
    except OSError as exc:
        raise KeystoreError(f"cannot read passphrase file {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_PASSPHRASE_FILE:
        raise KeystoreError(f"passphrase file {path} is over {_MAX_PASSPHRASE_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeystoreError(f"passphrase file {path} is not UTF-8 text") from None
    passphrase = text.split("\n", 1)[0].removesuffix("\r")
    if not passphrase:
        raise KeystoreError(f"passphrase file {path} is empty (the first line is the passphrase)")
    return passphrase
