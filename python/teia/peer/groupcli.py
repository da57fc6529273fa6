"""``teia group create|add|remove|leave|rename|send|list|history``: groups from the command
line.

Changes and texts need the profile online (they are encrypted for each member over its
pairwise session): the command brings the profile online, does its work, and waits up to
``--timeout`` seconds for every pairwise payload to be delivered or stored. Exit status 0 when
all were, 3 when some are still in the outbox (the next time the profile is online — ``teia
peer run``, a bot — delivers them). ``list`` and ``history`` only read the profile, so they
work beside a running peer. Groups are named by their hex ID (``teia group list``), members by
contact name or peer ID. ``--json`` prints JSON (one object, or one per line).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from teia.peer.groups import GroupInfo, Groups, conversation_of, parse_group_id, stored_groups
from teia.peer.peer import Peer
from teia.peer.profile import Profile

__all__ = ["register"]


def register(sub: Any) -> None:
    """Register ``group`` and its actions on the ``teia`` subparsers."""
    from teia.peer.cli import _positive, _profile_args

    group = sub.add_parser("group", help="groups: create, add, remove, leave, rename, send, list")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        parser = actions.add_parser(name, help=help_text)
        parser.set_defaults(handler=handler)
        return parser

    def online(parser: Any) -> None:
        parser.add_argument(
            "--timeout", type=_positive, default=15.0, help="wait at most SECONDS (default 15)"
        )
        parser.add_argument("--json", action="store_true", help="print JSON")
        _profile_args(parser)

    create = action("create", "create a group (we are its first admin)", run_create)
    create.add_argument("name", help="the group's name")
    create.add_argument("members", nargs="*", help="members (contact names or peer IDs)")
    create.add_argument(
        "--admin", action="append", default=[], metavar="MEMBER", help="also an admin"
    )
    online(create)
    add = action("add", "add members (admins only)", run_add)
    add.add_argument("group", help="group ID (hex)")
    add.add_argument("members", nargs="+")
    add.add_argument("--admin", action="store_true", help="make them admins too")
    online(add)
    remove = action("remove", "remove members; the others move to new keys", run_remove)
    remove.add_argument("group", help="group ID (hex)")
    remove.add_argument("members", nargs="+")
    online(remove)
    leave = action("leave", "leave a group (an admin removes us; an admin removes itself)",
                   run_leave)  # fmt: skip
    leave.add_argument("group", help="group ID (hex)")
    online(leave)
    rename = action("rename", "rename a group (admins only)", run_rename)
    rename.add_argument("group", help="group ID (hex)")
    rename.add_argument("name")
    online(rename)
    send = action("send", "send a text to every member", run_send)
    send.add_argument("group", help="group ID (hex)")
    send.add_argument("text")
    online(send)
    listing = action("list", "the groups of this profile", run_list)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _profile_args(listing)
    history = action("history", "a group's conversation", run_history)
    history.add_argument("group", help="group ID (hex)")
    history.add_argument("--limit", type=int, default=50)
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    _profile_args(history)


def _open(args: argparse.Namespace) -> Profile:
    from teia.peer.cli import _open as open_profile

    return open_profile(args)


def _info_json(info: GroupInfo) -> dict[str, Any]:
    return {
        "group_id": info.group_id,
        "name": info.name,
        "version": info.version,
        "members": [str(m) for m in info.members],
        "admins": [str(a) for a in info.admins],
        "joined": info.joined,
        "conversation": info.conversation,
    }


def _online(args: argparse.Namespace, work: Callable[[Groups], Awaitable[dict[str, Any]]]) -> int:
    from teia.peer.cli import _ephemeral

    async def run(profile: Profile) -> int:
        async with Peer.open(profile, listen=_ephemeral(profile.config.listen)) as peer:
            report = await work(peer.groups)
            settled = False
            with anyio.move_on_after(args.timeout):
                await peer.groups.wait_delivered()
                settled = True
            report["settled"] = settled
            if args.json:
                print(json.dumps(report))
            else:
                print(
                    " ".join(
                        f"{k}={v}" for k, v in report.items() if k not in ("members", "admins")
                    )
                )
                if not settled:
                    print("queued: some members are unreachable for now; delivered later")
            return 0 if settled else 3

    with _open(args) as profile:
        return anyio.run(run, profile, backend="trio")


def run_create(args: argparse.Namespace) -> int:
    async def work(groups: Groups) -> dict[str, Any]:
        return _info_json(await groups.create(args.name, args.members, admins=args.admin))

    return _online(args, work)


def run_add(args: argparse.Namespace) -> int:
    async def work(groups: Groups) -> dict[str, Any]:
        return _info_json(await groups.add(args.group, args.members, admin=args.admin))

    return _online(args, work)


def run_remove(args: argparse.Namespace) -> int:
    async def work(groups: Groups) -> dict[str, Any]:
        return _info_json(await groups.remove(args.group, args.members))

    return _online(args, work)


def run_leave(args: argparse.Namespace) -> int:
    async def work(groups: Groups) -> dict[str, Any]:
        return _info_json(await groups.leave(args.group))

    return _online(args, work)


def run_rename(args: argparse.Namespace) -> int:
    async def work(groups: Groups) -> dict[str, Any]:
        return _info_json(await groups.rename(args.group, args.name))

    return _online(args, work)


def run_send(args: argparse.Namespace) -> int:
    async def work(groups: Groups) -> dict[str, Any]:
        sent = await groups.send(args.group, args.text)
        return {"message_id": sent.message_id, "members": len(sent.deliveries)}

    return _online(args, work)


def run_list(args: argparse.Namespace) -> int:
    with _open(args) as profile:
        held = stored_groups(profile.db)
    for info in held:
        if args.json:
            print(json.dumps(_info_json(info)))
        else:
            where = "" if info.joined else "  (not a member)"
            print(
                f"{info.group_id}  v{info.version}  {len(info.members):>4} members  "
                f"{info.name}{where}"
            )
    return 0


def run_history(args: argparse.Namespace) -> int:
    from teia.peer.cli import _message_json, _names

    with _open(args) as profile:
        rows = profile.db.history(conversation_of(parse_group_id(args.group)), limit=args.limit)
        names = _names(profile)
    for row in rows:
        if args.json:
            print(json.dumps(_message_json(row)))
        else:
            who = "me" if row.outgoing else names.get(row.peer_id, row.peer_id[-8:])
            print(f"{who}: {row.text}")
    return 0
