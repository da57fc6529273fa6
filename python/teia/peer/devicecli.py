"""``teia device create|list|code|link|remove|introduce|send|lookup``: multi-device accounts
from the command line.

Everything but ``list`` brings the profile online, does its work, then waits up to
``--timeout`` seconds for what it queued (lists, copies, history) to be delivered or stored:
exit status 0 when all was, 3 when some is still in the outbox (the next time the profile is
online delivers it). ``code`` prints the link code and stays online until a device has linked
with it (or ``--timeout``); ``link CODE`` runs on the new device and waits for the history.
``lookup ACCOUNT`` asks the DHT for an account's device list (exit 1 when it has none).
Codes are printed on the terminal only, never logged. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from teia.peer.devices import Devices, stored_account
from teia.peer.devicewire import DeviceList
from teia.peer.peer import Peer
from teia.peer.profile import Profile

__all__ = ["register"]


def register(sub: Any) -> None:
    """Register ``device`` and its actions on the ``teia`` subparsers."""
    from teia.peer.cli import _positive, _profile_args

    device = sub.add_parser("device", help="this profile's account and its devices")
    actions = device.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        parser = actions.add_parser(name, help=help_text)
        parser.set_defaults(handler=handler)
        parser.add_argument("--json", action="store_true", help="print JSON")
        _profile_args(parser)
        return parser

    def online(parser: Any, default: float = 15.0) -> None:
        parser.add_argument(
            "--timeout",
            type=_positive,
            default=default,
            help=f"wait at most SECONDS (default {default:g})",
        )

    online(action("create", "make an account with this device as its primary", run_create))
    action("list", "the account and its devices (offline)", run_list)
    code = action("code", "show a one-time code to link a new device (primary only)", run_code)
    online(code, 600.0)
    link = action("link", "link this (new) device with the code shown on the primary", run_link)
    link.add_argument("code", help="the code shown by `teia device code` on the primary")
    online(link, 60.0)
    remove = action("remove", "remove a device from the account (primary only)", run_remove)
    remove.add_argument("device", help="the device's peer ID")
    online(remove)
    introduce = action("introduce", "exchange device lists with a device of another account",
                       run_introduce)  # fmt: skip
    introduce.add_argument("peer", help="a device of the other account (contact or peer ID)")
    online(introduce)
    send = action("send", "send a text to every device of an account", run_send)
    send.add_argument("account", help="the account ID")
    send.add_argument("text")
    online(send)
    lookup = action("lookup", "find an account's devices in the DHT", run_lookup)
    lookup.add_argument("account", help="the account ID")
    online(lookup)


def _list_json(devices: DeviceList | None, me: str) -> dict[str, Any]:
    if devices is None:
        return {}
    return {
        "version": devices.version,
        "devices": [str(d) for d in devices.devices],
        "this_device": me,
    }


def _report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
        else:
            print(f"{key}: {value}")


def _online(
    args: argparse.Namespace, work: Callable[[Peer, Devices], Awaitable[dict[str, Any]]]
) -> int:
    from teia.peer.cli import _ephemeral, _open

    async def run(profile: Profile) -> int:
        async with Peer.open(profile, listen=_ephemeral(profile.config.listen)) as peer:
            report = await work(peer, peer.devices)
            settled = False
            with anyio.move_on_after(args.timeout):
                await peer.devices.wait_delivered()
                settled = True
            report["settled"] = settled
            _report(args, report)
            return 0 if settled else 3

    with _open(args) as profile:
        return anyio.run(run, profile, backend="trio")


def run_create(args: argparse.Namespace) -> int:
    async def work(peer: Peer, devices: Devices) -> dict[str, Any]:
        account = await devices.create_account()
        return {
            "account": str(account),
            **_list_json(await devices.device_list(), str(peer.peer_id)),
        }

    return _online(args, work)


def run_list(args: argparse.Namespace) -> int:
    from teia.peer.cli import _open

    with _open(args) as profile:
        held = stored_account(profile.db)
        me = str(profile.identity.peer_id)
    if held is None:
        print("this device has no account (teia device create, or teia device link CODE)",
              file=sys.stderr)  # fmt: skip
        return 1
    report = {
        "account": str(held.account),
        "primary": held.primary,
        "removed": held.removed,
        **_list_json(held.devices, me),
    }
    _report(args, report)
    return 0


def run_code(args: argparse.Namespace) -> int:
    from teia.peer.cli import _open

    async def run(profile: Profile) -> int:
        async with Peer.open(profile) as peer:
            code = peer.devices.link_code(ttl=args.timeout)
            # The code goes to the terminal only: it is a secret for the next minutes.
            print(json.dumps({"code": code}) if args.json else f"link code: {code}", flush=True)
            linked = None
            with anyio.move_on_after(args.timeout):
                linked = await peer.devices.wait_linked()
                await peer.devices.wait_delivered()
            peer.devices.cancel_link_code()
            report: dict[str, Any] = {"linked": str(linked) if linked else None}
            report.update(_list_json(await peer.devices.device_list(), str(peer.peer_id)))
            _report(args, report)
            return 0 if linked else 3

    with _open(args) as profile:
        return anyio.run(run, profile, backend="trio")


def run_link(args: argparse.Namespace) -> int:
    async def work(peer: Peer, devices: Devices) -> dict[str, Any]:
        granted = await devices.link(args.code)
        received = None
        with anyio.move_on_after(args.timeout):
            received = await devices.wait_history()
        return {
            "account": str(granted.account),
            "history": received,
            **_list_json(granted, str(peer.peer_id)),
        }

    return _online(args, work)


def run_remove(args: argparse.Namespace) -> int:
    async def work(peer: Peer, devices: Devices) -> dict[str, Any]:
        updated = await devices.remove(args.device)
        return {"removed": args.device, **_list_json(updated, str(peer.peer_id))}

    return _online(args, work)


def run_introduce(args: argparse.Namespace) -> int:
    async def work(peer: Peer, devices: Devices) -> dict[str, Any]:
        target = await peer.resolve(args.peer)
        await devices.introduce(target)
        return {"introduced": str(target)}

    return _online(args, work)


def run_send(args: argparse.Namespace) -> int:
    async def work(peer: Peer, devices: Devices) -> dict[str, Any]:
        return {"message_id": await devices.send(args.account, args.text)}

    return _online(args, work)


def run_lookup(args: argparse.Namespace) -> int:
    from teia.peer.cli import _ephemeral, _open

    async def run(profile: Profile) -> int:
        async with Peer.open(profile, listen=_ephemeral(profile.config.listen)) as peer:
            found = None
            with anyio.move_on_after(args.timeout):
                found = await peer.devices.lookup(args.account)
            report: dict[str, Any] = {"account": args.account, "found": found is not None}
            report.update(_list_json(found, str(peer.peer_id)))
            _report(args, report)
            return 0 if found is not None else 1

    with _open(args) as profile:
        return anyio.run(run, profile, backend="trio")
