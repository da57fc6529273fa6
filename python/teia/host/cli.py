"""``teia ping`` and ``teia identify``: operators' probes of any libp2p QUIC host.

Both dial with a throwaway identity (nothing is stored), so they can be run from anywhere
against any node, ours or another libp2p implementation's. The target is a full multiaddr,
``/ip4|ip6|dns…/<host>/udp/<port>/quic-v1/p2p/<peer-id>``; without ``/p2p`` the peer ID is
learned (and shown) rather than checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import anyio

from teia.errors import InvalidMultiaddr, TeiaError
from teia.host.host import Host
from teia.identity import Identity, Multiaddr

__all__ = ["register", "run_identify", "run_ping"]

_MAX_COUNT = 1000


def _count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= _MAX_COUNT:
        raise argparse.ArgumentTypeError(f"count must be between 1 and {_MAX_COUNT}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def register(sub: Any) -> None:
    """Register ``teia ping`` and ``teia identify`` on the top-level subparsers."""
    target_help = "the host to probe: /ip4|ip6|dns/<host>/udp/<port>/quic-v1[/p2p/<peer-id>]"
    ping = sub.add_parser(
        "ping",
        help="ping a libp2p QUIC host (/ipfs/ping/1.0.0)",
        description="Connect to a host and measure round trips with libp2p ping.",
    )
    ping.add_argument("target", help=target_help)
    ping.add_argument("-c", "--count", type=_count, default=3, help="pings to send (default 3)")
    ping.add_argument(
        "--timeout", type=_positive, default=10.0, help="give up after SECONDS (default 10)"
    )
    ping.set_defaults(handler=run_ping)

    identify = sub.add_parser(
        "identify",
        help="ask a libp2p QUIC host who it is (/ipfs/id/1.0.0)",
        description="Connect to a host and print what identify says: peer ID, agent, "
        "protocols, listen addresses and the address it saw us at.",
    )
    identify.add_argument("target", help=target_help)
    identify.add_argument("--json", action="store_true", help="print one JSON object")
    identify.add_argument(
        "--timeout", type=_positive, default=10.0, help="give up after SECONDS (default 10)"
    )
    identify.set_defaults(handler=run_identify)


def _target(text: str) -> Multiaddr:
    addr = Multiaddr(text)
    if not addr.is_quic_v1:
        raise InvalidMultiaddr(f"{addr} is not a QUIC-v1 address (…/udp/<port>/quic-v1)")
    return addr


def _client_listen(target: Multiaddr) -> list[str]:
    """Bind the wildcard of the target's address family, on a random port."""
    if target.protocols[0] in ("ip6", "dns6"):
        return ["/ip6/::/udp/0/quic-v1"]
    return ["/ip4/0.0.0.0/udp/0/quic-v1"]


def run_ping(args: argparse.Namespace) -> int:
    """``teia ping``: prints one line per round trip and a summary."""
    target = _target(args.target)

    async def main() -> int:
        with anyio.fail_after(args.timeout):
            async with Host(Identity.generate(), listen=_client_listen(target)) as host:
                connection = await host.connect(target)
                peer = connection.remote_peer.peer_id
                print(f"PING {peer} at {target.without_peer_id()}", flush=True)
                rtts = await host.ping(peer, count=args.count)
        for index, rtt in enumerate(rtts, 1):
            print(f"  seq={index} rtt={rtt * 1000:.3f} ms")
        ms = sorted(rtt * 1000 for rtt in rtts)
        print(
            f"{len(ms)} pings: min {ms[0]:.3f} / median {ms[len(ms) // 2]:.3f} / "
            f"max {ms[-1]:.3f} ms"
        )
        return 0

    return _run(main, args.timeout)


def run_identify(args: argparse.Namespace) -> int:
    """``teia identify``: prints the peer's identify answer."""
    target = _target(args.target)

    async def main() -> int:
        with anyio.fail_after(args.timeout):
            async with Host(Identity.generate(), listen=_client_listen(target)) as host:
                connection = await host.connect(target)
                peer = connection.remote_peer.peer_id
                info = await host.identify(peer)
        observed = info.observed_multiaddr
        report = {
            "peer_id": str(peer),
            "agent_version": info.agent_version,
            "protocol_version": info.protocol_version,
            "protocols": sorted(info.protocols),
            "listen_addrs": [str(a) for a in info.listen_multiaddrs],
            "observed_addr": None if observed is None else str(observed),
        }
        if args.json:
            print(json.dumps(report, indent=None))
            return 0
        for key, value in report.items():
            if isinstance(value, list):
                print(f"{key}:")
                for item in value:
                    print(f"  {item}")
            else:
                print(f"{key}: {value}")
        return 0

    return _run(main, args.timeout)


def _run(main: Any, timeout: float) -> int:
    # aioquic logs every connection error it sends; the command reports the error itself.
    logging.getLogger("quic").setLevel(logging.CRITICAL)
    try:
        result: int = anyio.run(main, backend="trio")
    except TimeoutError:
        print(f"teia: no answer within {timeout:g} s", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Task groups wrap what the body raised; report our own typed error plainly.
        teia_errors, _ = group.split(TeiaError)
        if teia_errors is None:
            raise
        raise _first(teia_errors) from None
    return result


def _first(group: BaseExceptionGroup[TeiaError]) -> TeiaError:
    error = group.exceptions[0]
    return _first(error) if isinstance(error, BaseExceptionGroup) else error
