"""``teia file send|cancel|list``: files from the command line (`teia.peer.attachments`).

``send`` brings the profile online, offers the file and stays online (serving its chunks) until
the recipient has it, at most ``--timeout`` seconds: exit status 0 when it has, 3 when the
transfer goes on later (the recipient was away: its chunks are in the outbox for the store, or
the file waits for a path; the next time the profile is online — ``teia peer run``, a bot —
continues). When another process has the profile online, the file is encrypted and its offer
queued here, and that process delivers the offer and serves the chunks (exit status 0 once
queued). ``cancel FILE_ID`` calls a transfer off (either direction): it deletes this side's
copy, tells the other side and waits up to ``--timeout`` seconds for that notice to be delivered
or stored (exit 0; 3 if it is still in the outbox). ``list`` only reads the profile.
``--json`` prints JSON (one object, or one per line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anyio

from teia.errors import ProfileInUse
from teia.peer.attachments import Transfer, queue_file, stored_transfers
from teia.peer.peer import Peer, resolve_recipient
from teia.peer.profile import Profile

__all__ = ["register"]


def register(sub: Any) -> None:
    """Register ``file`` and its actions on the ``teia`` subparsers."""
    from teia.peer.cli import _positive, _profile_args

    files = sub.add_parser("file", help="files: send one to a contact, cancel, list transfers")
    actions = files.add_subparsers(dest="action", metavar="ACTION", required=True)
    send = actions.add_parser(
        "send",
        help="send a file (up to 100 MiB), end-to-end encrypted",
        description="Offer PATH to a contact and stay online until it has the file.",
    )
    send.add_argument("to", help="contact name or peer ID")
    send.add_argument("path", type=Path, help="the file")
    send.add_argument("--name", help="the name the recipient sees (default: the file's)")
    send.add_argument(
        "--timeout", type=_positive, default=600.0, help="wait at most SECONDS (default 600)"
    )
    send.add_argument("--json", action="store_true", help="print one JSON object")
    _profile_args(send)
    send.set_defaults(handler=run_send)
    cancel = actions.add_parser("cancel", help="call off a transfer, sent or received")
    cancel.add_argument("file_id", help="the transfer's file ID (teia file list)")
    cancel.add_argument(
        "--timeout", type=_positive, default=15.0, help="wait at most SECONDS (default 15)"
    )
    cancel.add_argument("--json", action="store_true", help="print one JSON object")
    _profile_args(cancel)
    cancel.set_defaults(handler=run_cancel)
    listing = actions.add_parser("list", help="files sent and received, and their state")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _profile_args(listing)
    listing.set_defaults(handler=run_list)


def _json(transfer: Transfer) -> dict[str, Any]:
    return {
        "file_id": transfer.file_id,
        "peer": str(transfer.peer),
        "direction": "out" if transfer.outgoing else "in",
        "name": transfer.name,
        "size": transfer.size,
        "chunks": transfer.chunks,
        "have": transfer.have,
        "state": transfer.state,
        "path": transfer.path,
        "saved_as": str(transfer.saved_as) if transfer.saved_as else None,
    }


def _show(args: argparse.Namespace, transfer: Transfer) -> None:
    if args.json:
        print(json.dumps(_json(transfer)))
        return
    arrow = "→" if transfer.outgoing else "←"
    progress = "" if transfer.outgoing else f"  {transfer.have}/{transfer.chunks} chunks"
    where = f"  {transfer.saved_as}" if transfer.saved_as else ""
    print(
        f"{transfer.file_id}  {arrow} {str(transfer.peer)[-8:]}  {transfer.state:<14}"
        f"{transfer.size:>11} B  {transfer.name}{progress}{where}"
    )


def run_send(args: argparse.Namespace) -> int:
    from teia.peer.cli import _open

    with _open(args) as profile:
        to = resolve_recipient(profile.db, args.to)
        try:
            return anyio.run(_send_online, profile, to, args, backend="trio")
        except ProfileInUse:
            file_id = queue_file(profile, to, args.path, args.name)
            transfers = {t.file_id: t for t in stored_transfers(profile.db)}
            _show(args, transfers[file_id])
            if not args.json:
                print("queued; the running peer offers it and serves it")
            return 0


async def _send_online(profile: Profile, to: Any, args: argparse.Namespace) -> int:
    from teia.peer.cli import _ephemeral

    async with Peer.open(profile, listen=_ephemeral(profile.config.listen)) as peer:
        file_id = await peer.attachments.send_file(to, args.path, name=args.name)
        with anyio.move_on_after(args.timeout):
            _show(args, await peer.attachments.wait_complete(file_id))
            return 0
        transfer = await peer.attachments.status(file_id)
    _show(args, transfer)
    if not args.json:
        print("not complete yet: the next time this profile is online the transfer goes on")
    return 3


def run_cancel(args: argparse.Namespace) -> int:
    from teia.peer.cli import _ephemeral, _open

    async def run(profile: Profile) -> int:
        async with Peer.open(profile, listen=_ephemeral(profile.config.listen)) as peer:
            transfer = await peer.attachments.cancel(args.file_id)
            notice = peer.attachments.cancel_notices.get(transfer.file_id)
            settled = notice is None
            if notice is not None:
                with anyio.move_on_after(args.timeout):
                    await peer.wait_delivered(notice)
                    settled = True
        _show(args, transfer)
        return 0 if settled else 3

    with _open(args) as profile:
        return anyio.run(run, profile, backend="trio")


def run_list(args: argparse.Namespace) -> int:
    from teia.peer.cli import _open

    with _open(args) as profile:
        transfers = stored_transfers(profile.db)
    for transfer in transfers:
        _show(args, transfer)
    return 0
