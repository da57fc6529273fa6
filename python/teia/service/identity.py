"""A service node's own identity, kept in its data directory.

Operator nodes (discovery, relay, store) have no passphrase prompt: their libp2p private key
lives in a file of the data directory, created 0600 (atomically) on first start and reused
afterwards, so the node keeps its peer ID across restarts.
"""

from __future__ import annotations

import os
from pathlib import Path

from teia.errors import ConfigError, InvalidKeyEncoding
from teia.identity import Identity

__all__ = ["node_identity"]


def node_identity(data_dir: Path, filename: str) -> Identity:
    """The node's identity from ``data_dir / filename``, created on first start."""
    path = data_dir / filename
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise ConfigError(f"{path} is readable by others; chmod 600 it")
            return Identity.from_private_key_protobuf(path.read_bytes())
        identity = Identity.generate()
        partial = path.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(identity.to_private_key_protobuf())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        return identity
    except OSError as exc:
        raise ConfigError(
            f"data-dir {data_dir}: cannot keep the node identity there: {exc.strerror or exc}"
        ) from None
    except InvalidKeyEncoding as exc:
        raise ConfigError(f"{path} is not a usable identity ({exc}); move it aside") from None
