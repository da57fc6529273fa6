"""The person-facing commands: ``teia contacts``, ``teia send``, ``teia inbox``, ``teia chat``,
``teia peer run``.

Every command works on a profile directory: ``--profile DIR``, by default the directory of the
default keystore, so ``teia init`` then ``teia contacts add …`` needs no flags (``teia init
--keystore DIR/identity.key`` starts a profile elsewhere). The passphrase comes the way ``teia
init`` / ``teia id`` take it: ``--passphrase-file``, ``$TEIA_PASSPHRASE``, or a prompt.

One process at a time brings a profile online. When ``teia peer run`` (or a bot, or ``teia
chat``) has it, ``teia send`` queues the message into the profile's outbox and the running peer
delivers it; ``teia inbox`` only reads history, so it works beside a running peer. ``--json``
prints one JSON object (``send``) or one per line (``contacts list``, ``inbox``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from teia.errors import ConfigError, ProfileInUse
from teia.identity.cli import _passphrase
from teia.identity.multiaddr import Multiaddr
from teia.peer.db import Contact, MessageRow
from teia.peer.peer import (
    Delivered,
    IdentityChanged,
    Peer,
    Read,
    SessionStarted,
    queue_retraction,
    resolve_recipient,
)
from teia.peer.profile import Profile, default_profile_dir
from teia.peer.safety import format_safety_number, safety_number
from teia.service import ServiceConfig, ServiceContext, add_arguments, load, run, setting

__all__ = ["PeerServiceConfig", "register"]


def _profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help=f"profile directory (default: {default_profile_dir()})",
    )
    parser.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="read the passphrase from the first line of FILE (default: $TEIA_PASSPHRASE, "
        "else a prompt if stdin is a terminal)",
    )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def register(sub: Any) -> None:
    """Register ``contacts``, ``send``, ``inbox``, ``chat`` and ``peer`` on the subparsers."""
    contacts = sub.add_parser("contacts", help="the address book: add, list, show, verify")
    actions = contacts.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a contact (or update one)")
    add.add_argument("name", help="a name for the contact")
    add.add_argument("peer_id", help="its peer ID (12D3KooW…)")
    add.add_argument(
        "--addr", action="append", default=[], metavar="MULTIADDR", help="where to reach it"
    )
    _profile_args(add)
    add.set_defaults(handler=run_contacts_add)
    listing = actions.add_parser("list", help="list the contacts")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _profile_args(listing)
    listing.set_defaults(handler=run_contacts_list)
    show = actions.add_parser("show", help="a contact and the safety number to compare")
    show.add_argument("name", help="contact name or peer ID")
    show.add_argument("--json", action="store_true")
    _profile_args(show)
    show.set_defaults(handler=run_contacts_show)
    verify = actions.add_parser(
        "verify", help="mark a contact verified (after comparing safety numbers)"
    )
    verify.add_argument("name", help="contact name or peer ID")
    _profile_args(verify)
    verify.set_defaults(handler=run_contacts_verify)

    send = sub.add_parser(
        "send",
        help="send a message",
        description="Send TEXT to a contact (name or peer ID) and wait for it to be delivered "
        "or stored. Exit status 0 when delivered or stored, 3 when it is queued in the outbox "
        "(the recipient is unreachable for now; `teia peer run` keeps trying).",
    )
    send.add_argument("to", help="contact name or peer ID")
    send.add_argument("text", help="the message")
    send.add_argument(
        "--timeout", type=_positive, default=15.0, help="wait at most SECONDS (default 15)"
    )
    send.add_argument("--json", action="store_true", help="print one JSON object")
    _profile_args(send)
    send.set_defaults(handler=run_send)

    retract = sub.add_parser(
        "retract",
        help="delete one of your texts for everyone",
        description="Empty one of your texts (MESSAGE_ID as `teia send --json` or `teia inbox "
        "--json` show it) here and, once the notice reaches it, in the recipient's history. "
        "Exit status 0 when the notice is delivered or stored, 3 when it is queued.",
    )
    retract.add_argument("message_id", help="the text's message ID (hex)")
    retract.add_argument(
        "--timeout", type=_positive, default=15.0, help="wait at most SECONDS (default 15)"
    )
    retract.add_argument("--json", action="store_true", help="print one JSON object")
    _profile_args(retract)
    retract.set_defaults(handler=run_retract)

    inbox = sub.add_parser(
        "inbox",
        help="show received messages",
        description="Show the latest messages from history (all conversations, or one). "
        "With --wait, go online first for SECONDS to receive (and fetch store inboxes); "
        "with --count too, only until COUNT new messages have arrived.",
    )
    inbox.add_argument("--contact", help="one conversation (name or peer ID), both directions")
    inbox.add_argument("--search", metavar="WORDS", help="messages containing every word")
    inbox.add_argument("--limit", type=int, default=50)
    inbox.add_argument("--wait", type=_positive, metavar="SECONDS", help="receive first")
    inbox.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="COUNT",
        help="with --wait: stop receiving once COUNT new messages arrived",
    )
    inbox.add_argument("--json", action="store_true", help="one JSON object per line")
    _profile_args(inbox)
    inbox.set_defaults(handler=run_inbox)

    chat = sub.add_parser(
        "chat",
        help="chat with a contact interactively",
        description="Go online and chat with one contact: lines typed are sent; incoming "
        "messages and delivery states (✓ delivered, ⌛ queued, ✉ stored) are printed.",
    )
    chat.add_argument("contact", help="contact name or peer ID")
    _profile_args(chat)
    chat.set_defaults(handler=run_chat)

    peer = sub.add_parser("peer", help="run the peer as a daemon")
    peer_actions = peer.add_subparsers(dest="action", metavar="ACTION", required=True)
    daemon = peer_actions.add_parser(
        "run",
        help="keep the profile online: receive, deliver the outbox, keep prekeys topped up",
        description="Run the peer on a profile until SIGTERM: listen, publish its record and "
        "prekey bundle, receive into history, deliver the outbox (also what `teia send` "
        "queues meanwhile). Logs and Prometheus metrics carry metadata only.",
    )
    add_arguments(daemon, PeerServiceConfig)
    daemon.set_defaults(handler=run_daemon)

    from teia.peer import groupcli

    groupcli.register(sub)

    from teia.peer import devicecli

    devicecli.register(sub)

    from teia.peer import filecli

    filecli.register(sub)


# --- helpers --------------------------------------------------------------------------------


def _open(args: argparse.Namespace) -> Profile:
    directory: Path = args.profile or default_profile_dir()
    return Profile.open(directory, _passphrase(args, what=f"profile {directory}"))


def _contact_json(contact: Contact, profile: Profile) -> dict[str, Any]:
    return {
        "name": contact.name,
        "peer_id": contact.peer_id,
        "trust": contact.trust,
        "previous_peer_id": contact.previous_peer_id,
        "addrs": list(contact.addrs),
    }


def _message_json(row: MessageRow) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "message_id": row.message_id.hex(),
        "peer_id": row.peer_id,
        "direction": "out" if row.outgoing else "in",
        "text": row.text,
        "sent_ms": row.sent_ms,
        "received_ms": row.received_ms,
        "state": row.state,
        "path": row.path,
        "latency_ms": row.latency_ms,
    }


def _find_contact(profile: Profile, who: str) -> Contact:
    from teia.errors import UnknownContact

    contact = profile.db.contact_by_name(who) or profile.db.contact(who)
    if contact is None:
        raise UnknownContact(f"no contact {who}; add it with `teia contacts add NAME PEER_ID`")
    return contact


def _names(profile: Profile) -> dict[str, str]:
    return {c.peer_id: c.name for c in profile.db.contacts() if c.name}


def _state_mark(row: MessageRow) -> str:
    if row.state == "delivered":
        latency = f" {row.latency_ms:.1f} ms" if row.latency_ms is not None else ""
        return f"✓ delivered ({row.path}{latency})"
    if row.state == "read":
        return "✓✓ read"
    if row.state == "stored":
        return "✉ stored (recipient offline)"
    if row.state == "pending":
        return "⌛ queued"
    return row.state


# --- contacts -------------------------------------------------------------------------------


def run_contacts_add(args: argparse.Namespace) -> int:
    from teia.identity import PeerId

    peer_id = PeerId.from_string(args.peer_id)
    if peer_id.public_key is None:
        raise ConfigError(f"{peer_id} does not embed an Ed25519 key; teia peers always do")
    addrs = [str(Multiaddr(a)) for a in args.addr]
    with _open(args) as profile:
        contact, previous = profile.db.upsert_contact(
            str(peer_id), peer_id.public_key, name=args.name, addrs=addrs
        )
    if previous is not None:
        print(
            f"WARNING: {args.name} was {previous.peer_id} and is now {contact.peer_id}: a new "
            "identity key. Compare safety numbers (`teia contacts show`) before trusting it.",
            file=sys.stderr,
        )
    print(f"{contact.name}  {contact.peer_id}  {contact.trust}")
    return 0


def run_contacts_list(args: argparse.Namespace) -> int:
    with _open(args) as profile:
        for contact in profile.db.contacts():
            if args.json:
                print(json.dumps(_contact_json(contact, profile)))
            else:
                print(f"{contact.name or '-':<16} {contact.peer_id}  {contact.trust}")
    return 0


def run_contacts_show(args: argparse.Namespace) -> int:
    from teia.identity import PeerId

    with _open(args) as profile:
        contact = _find_contact(profile, args.name)
        peer = PeerId.from_string(contact.peer_id)
        me = profile.identity
        number = safety_number(
            me.public_key, me.peer_id.to_bytes(), contact.identity_key, peer.to_bytes()
        )
        if args.json:
            print(json.dumps({**_contact_json(contact, profile), "safety_number": number}))
            return 0
        print(f"name:     {contact.name or '-'}")
        print(f"peer ID:  {contact.peer_id}")
        print(f"trust:    {contact.trust}")
        if contact.previous_peer_id:
            print(f"previous: {contact.previous_peer_id}")
        for addr in contact.addrs:
            print(f"address:  {addr}")
        print("safety number (compare with theirs):")
        print(format_safety_number(number))
    return 0


def run_contacts_verify(args: argparse.Namespace) -> int:
    with _open(args) as profile:
        contact = _find_contact(profile, args.name)
        profile.db.set_trust(contact.peer_id, "verified")
    print(f"{contact.name or contact.peer_id}: verified")
    return 0


# --- send and inbox -------------------------------------------------------------------------


def run_send(args: argparse.Namespace) -> int:
    with _open(args) as profile:
        peer_id = resolve_recipient(profile.db, args.to)
        try:
            return anyio.run(_send_online, profile, peer_id, args, backend="trio")
        except ProfileInUse:
            message_id = profile.db.queue_text(str(peer_id), args.text)
            _report_send(args, message_id.hex(), "pending", None, None, "the running peer")
            return 0


async def _send_online(profile: Profile, peer_id: Any, args: argparse.Namespace) -> int:
    # Any free port: a fixed port in the profile may belong to a daemon of another profile.
    async with Peer.open(profile, listen=_ephemeral(profile.config.listen)) as peer:
        message_id = await peer.send(peer_id, args.text)
        with anyio.move_on_after(args.timeout):
            row = await peer.wait_delivered(message_id)
            _report_send(args, message_id, row.state, row.path, row.latency_ms, None)
            return 0
    _report_send(args, message_id, "pending", None, None, None)
    return 3


def run_retract(args: argparse.Namespace) -> int:
    with _open(args) as profile:
        try:
            return anyio.run(_retract_online, profile, args, backend="trio")
        except ProfileInUse:
            # The running peer delivers the notice from the outbox.
            queue_retraction(profile, args.message_id)
            _report_retract(args, "pending")
            return 0


async def _retract_online(profile: Profile, args: argparse.Namespace) -> int:
    async with Peer.open(profile, listen=_ephemeral(profile.config.listen)) as peer:
        notice = await peer.retract(args.message_id)
        if notice is None:
            _report_retract(args, "retracted")
            return 0
        with anyio.move_on_after(args.timeout):
            row = await peer.wait_delivered(notice)
            _report_retract(args, row.state)
            return 0
    _report_retract(args, "pending")
    return 3


def _report_retract(args: argparse.Namespace, notice: str) -> None:
    if args.json:
        print(json.dumps({"message_id": args.message_id, "notice": notice}))
    elif notice == "pending":
        print("retracted here; the notice is queued for the recipient")
    else:
        print(f"retracted; the notice is {notice}")


def _ephemeral(listen: list[str]) -> list[str]:
    out = []
    for text in listen:
        addr = Multiaddr(text)
        host, _ = addr.to_udp_address()
        kind = addr.protocols[0]
        out.append(f"/{kind}/{host}/udp/0/quic-v1")
    return out


def _report_send(
    args: argparse.Namespace,
    message_id: str,
    state: str,
    path: str | None,
    latency: float | None,
    queued_for: str | None,
) -> None:
    if args.json:
        print(
            json.dumps(
                {"message_id": message_id, "state": state, "path": path, "latency_ms": latency}
            )
        )
    elif state == "delivered":
        print(f"delivered via {path} in {latency:.1f} ms" if latency is not None else "delivered")
    elif state == "stored":
        print("stored for the recipient (offline); it gets it when it comes back")
    elif queued_for:
        print(f"queued; {queued_for} delivers it")
    else:
        print("queued: recipient unreachable for now; `teia peer run` keeps trying")


def run_inbox(args: argparse.Namespace) -> int:
    with _open(args) as profile:
        if args.wait:
            anyio.run(_receive_for, profile, args.wait, args.count, backend="trio")
        if args.search:
            rows = list(reversed(profile.db.search(args.search, limit=args.limit)))
        elif args.contact:
            peer_id = resolve_recipient(profile.db, args.contact)
            rows = profile.db.history(str(peer_id), limit=args.limit)
        else:
            rows = profile.db.recent(limit=args.limit, incoming_only=True)
        names = _names(profile)
    for row in rows:
        if args.json:
            print(json.dumps(_message_json(row)))
            continue
        who = names.get(row.peer_id, row.peer_id[-8:])
        arrow = f"→ {who}" if row.outgoing else f"{who}"
        mark = f"  [{_state_mark(row)}]" if row.outgoing else ""
        print(f"{_clock(row.sent_ms)}  {arrow}: {row.text}{mark}")
    return 0


async def _receive_for(profile: Profile, seconds: float, count: int = 0) -> None:
    """Online for ``seconds``, or until ``count`` (> 0) new messages arrived."""
    async with Peer.open(profile) as peer:
        with anyio.move_on_after(seconds):
            if count <= 0:
                await anyio.sleep_forever()
            got = 0
            async for _ in peer.messages():
                got += 1
                if got >= count:
                    break


def _clock(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


# --- chat -----------------------------------------------------------------------------------


def run_chat(args: argparse.Namespace) -> int:
    with _open(args) as profile:
        peer_id = resolve_recipient(profile.db, args.contact)
        name = args.contact
        anyio.run(_chat, profile, peer_id, name, backend="trio")
    return 0


async def _chat(profile: Profile, peer_id: Any, name: str) -> None:
    async with Peer.open(profile) as peer, peer.events() as events:
        print(f"chatting with {name} ({peer_id}); Ctrl-D to leave", flush=True)
        for row in await peer.history(peer_id, limit=10):
            who = "me" if row.outgoing else name
            print(f"  {who}: {row.text}", flush=True)
        await peer.mark_read(peer_id)  # shown: read (the contact is told, unless turned off)
        async with anyio.create_task_group() as tg:

            async def show_incoming() -> None:
                async for message in peer.messages():
                    if message.sender == peer_id:
                        print(f"{name}: {message.text}", flush=True)
                        await peer.mark_read(peer_id, [message.message_id])

            async def show_events() -> None:
                async for event in events:
                    if isinstance(event, Delivered) and event.peer == peer_id:
                        mark = "✉ stored" if event.path == "stored" else "✓ delivered"
                        latency = f" {event.latency_ms:.1f} ms" if event.latency_ms else ""
                        print(f"  {mark} ({event.path}{latency})", flush=True)
                    elif isinstance(event, Read) and event.peer == peer_id:
                        print(f"  ✓✓ read ({len(event.message_ids)})", flush=True)
                    elif isinstance(event, IdentityChanged):
                        print(f"  ! {event.name} changed identity: verify it", flush=True)
                    elif isinstance(event, SessionStarted) and event.peer == peer_id:
                        print("  (new session)", flush=True)

            tg.start_soon(show_incoming)
            tg.start_soon(show_events)
            stdin = anyio.wrap_file(sys.stdin)
            sent: list[str] = []
            async for line in stdin:
                text = line.rstrip("\n")
                if text:
                    sent.append(await peer.send(peer_id, text))
                    print("  ⌛ sending", flush=True)
            with anyio.move_on_after(5):  # let what was typed last leave
                for message_id in sent:
                    await peer.wait_delivered(message_id)
            tg.cancel_scope.cancel()


# --- the daemon -----------------------------------------------------------------------------


@dataclass
class PeerServiceConfig(ServiceConfig):
    """``teia peer run`` settings (the profile's own settings live in its config.toml)."""

    profile: Path = setting(default_profile_dir(), "profile directory", metavar="DIR")
    passphrase_file: Path | None = setting(
        None, "file whose first line is the passphrase (else $TEIA_PASSPHRASE)", metavar="FILE"
    )
    listen: list[str] = setting(
        [], "QUIC listen address (overrides the profile's)", metavar="MULTIADDR"
    )


def run_daemon(args: argparse.Namespace) -> int:
    config = load(PeerServiceConfig, args)
    profile = Profile.open(
        config.profile,
        _passphrase(
            argparse.Namespace(passphrase_file=config.passphrase_file),
            what=f"profile {config.profile}",
        ),
    )
    try:
        return run("peer", config, lambda ctx: _serve(ctx, profile))
    finally:
        profile.close()


async def _serve(ctx: ServiceContext, profile: Profile) -> None:
    from prometheus_client import Gauge

    config = ctx.config
    assert isinstance(config, PeerServiceConfig)
    async with Peer.open(profile, listen=config.listen or None) as peer:
        stats = Gauge(
            "teia_peer_messages", "messages by outcome (counts only)", ["outcome"],
            registry=ctx.registry,
        )  # fmt: skip
        for outcome in ("received", "refused", "duplicates"):
            stats.labels(outcome).set_function(partial(peer.stats.__getitem__, outcome))
        Gauge(
            "teia_peer_pending_recipients", "recipients with undelivered envelopes",
            registry=ctx.registry,
        ).set_function(lambda: peer.pending_recipients)  # fmt: skip
        puncher = peer.host.holepunch
        if puncher is not None:
            punches = Gauge(
                "teia_peer_holepunch", "relayed connections upgraded or not, by outcome",
                ["outcome"], registry=ctx.registry,
            )  # fmt: skip
            for outcome in puncher.stats:
                punches.labels(outcome).set_function(partial(puncher.stats.__getitem__, outcome))
        ctx.ready(peer_id=str(peer.peer_id), listen=",".join(str(a) for a in peer.addrs))
        await anyio.sleep_forever()
