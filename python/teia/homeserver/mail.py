"""Delivery of verification mails for the identity service: by SMTP, or into a directory.

Both deliveries take a finished `email.message.EmailMessage`. `SmtpDelivery` hands it to an
SMTP server with the standard library's `smtplib` in a worker thread (smtplib blocks; the
service runs on trio, so asyncio SMTP clients do not fit), optionally after STARTTLS and a
login. `DirectoryDelivery` writes each message to its own file, readable by the owner only
(0600): tests and development setups read the token from there.

Neither logs a message, a token or a full address: only how many were sent and how it went.
"""

from __future__ import annotations

import os
import secrets
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from teia.errors import HomeserverError

__all__ = [
    "DirectoryDelivery",
    "MailDelivery",
    "MailDeliveryError",
    "SmtpDelivery",
    "mask_address",
]


class MailDeliveryError(HomeserverError):
    """A verification mail could not be handed over: the SMTP server refused it or was
    unreachable, or the mail directory is not writable. Check the ``smtp-*`` or
    ``identity-mail-dir`` settings."""


class MailDelivery(Protocol):
    """Hands a verification mail over for delivery."""

    @property
    def name(self) -> str:
        """``smtp`` or ``directory``: the metrics' label."""
        ...

    async def deliver(self, message: EmailMessage) -> None:
        """Deliver ``message``, or raise `MailDeliveryError`."""
        ...


def mask_address(address: str) -> str:
    """What logs may show of an e-mail address: its first character and its domain."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}…@{domain}" if local else "…"


@dataclass(frozen=True)
class SmtpDelivery:
    """Delivery through an SMTP server (submission port and STARTTLS, or a local relay)."""

    host: str
    port: int = 25
    starttls: bool = False
    username: str = ""
    password: str = ""
    timeout: float = 30.0
    ca_file: str = ""
    """Certificates to trust for STARTTLS instead of the system's (a private mail relay)."""
    name: str = "smtp"

    def _send(self, message: EmailMessage) -> None:
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    context = ssl.create_default_context(cafile=self.ca_file or None)
                    smtp.starttls(context=context)
                if self.username:
                    smtp.login(self.username, self.password)
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as exc:
            # The exception text may quote the server's reply, never the message itself.
            raise MailDeliveryError(
                f"the SMTP server {self.host}:{self.port} did not take the mail: "
                f"{type(exc).__name__}"
            ) from None

    async def deliver(self, message: EmailMessage) -> None:
        """Send ``message`` from a worker thread."""
        await anyio.to_thread.run_sync(self._send, message)


@dataclass(frozen=True)
class DirectoryDelivery:
    """Delivery into a directory: one ``.eml`` file (RFC 5322) per mail, mode 0600."""

    directory: Path
    name: str = "directory"

    def _write(self, message: EmailMessage) -> Path:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.directory / f"{secrets.token_hex(8)}.eml"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(message.as_bytes())
        except OSError as exc:
            raise MailDeliveryError(
                f"cannot write the mail into {self.directory}: {exc.strerror}"
            ) from None
        return path

    async def deliver(self, message: EmailMessage) -> None:
        """Write ``message`` to a new file in the directory (from a worker thread)."""
        await anyio.to_thread.run_sync(self._write, message)
