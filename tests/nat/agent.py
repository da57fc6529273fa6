"""A host with hole punching, run inside a lab namespace and driven through stdin/stdout.

Started as ``python agent.py CONFIG_JSON``; it brings a `Host` up on the namespace's address with
an allocation on the lab relay, meets the discovery node (so identify tells it its public
address), prints one JSON line ``{"event": "ready", …}`` and then answers one JSON line per
command line:

- ``{"cmd": "connect", "addr": A}``: dial ``A`` (a relayed address) through our allocation;
- ``{"cmd": "path", "peer": P}``: ``direct``, ``relayed`` or ``none``, and the remote address;
- ``{"cmd": "attempts", "count": N, "timeout": T}``: wait until N punch attempts have ended;
- ``{"cmd": "upgrade", "peer": P, "timeout": T}``: punch now;
- ``{"cmd": "wait_direct", "peer": P, "timeout": T}``: wait for a direct connection;
- ``{"cmd": "ping", "peer": P}``: a ping on the connection in use, with its path.

With ``dir`` in the config it runs a chat peer (`teia.Peer`, a new profile in ``dir``) instead
of a bare host, and also answers ``{"cmd": "contact", "peer": P, "addrs": [...]}`` and
``{"cmd": "send", "peer": P, "text": T}`` (waits for delivery; answers the path it took).

It exits when its stdin closes. Every wait is bounded by the command's timeout.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from teia.errors import HolePunchError, TeiaError
from teia.host.holepunch import HolePunchConfig
from teia.host.host import Host
from teia.identity import Identity, Multiaddr, PeerId
from teia.identity.keystore import KdfParams
from teia.peer import Peer, PeerConfig, Profile
from teia.relay.client import RelayClientConfig

PASSPHRASE = "nat lab"
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _path(host: Host, peer: PeerId) -> dict[str, Any]:
    connection = host.connection_to(peer)
    if connection is None:
        return {"path": "none", "remote": None}
    path = "relayed" if connection.is_relayed else "direct"
    return {"path": path, "remote": "{}:{}".format(*connection.remote_address)}


async def host_command(host: Host, request: dict[str, Any]) -> dict[str, Any]:
    """Answer one of the host commands above."""
    cmd = request["cmd"]
    puncher = host.holepunch
    assert puncher is not None
    timeout = float(request.get("timeout", 10))
    if cmd == "connect":
        with anyio.fail_after(timeout):
            connection = await host.connect(Multiaddr(request["addr"]), via_relay=True)
        return {"relayed": connection.is_relayed}
    peer = PeerId.from_string(request["peer"]) if "peer" in request else None
    if cmd == "path":
        assert peer is not None
        return _path(host, peer)
    if cmd == "attempts":
        with anyio.fail_after(timeout):
            results = await puncher.wait_attempts(int(request["count"]))
        return {
            "results": [
                {"success": r.success, "seconds": r.seconds, "reason": r.reason, "rtt": r.rtt}
                for r in results
            ],
            "stats": puncher.stats,
        }
    if cmd == "upgrade":
        assert peer is not None
        started = anyio.current_time()
        try:
            with anyio.fail_after(timeout):
                await puncher.upgrade(peer)
            ok, reason = True, "direct"
        except HolePunchError as exc:
            ok, reason = False, str(exc)
        return {"success": ok, "reason": reason, "seconds": anyio.current_time() - started}
    if cmd == "wait_direct":
        assert peer is not None
        with anyio.fail_after(timeout):
            while True:
                current = host.connection_to(peer)
                if current is not None and not current.is_relayed:
                    break
                await puncher.wait_attempts(len(puncher.results) + 1)
        return _path(host, peer)
    if cmd == "ping":
        assert peer is not None
        with anyio.fail_after(timeout):
            rtt = (await host.ping(peer))[0]
        return {"rtt": rtt, **_path(host, peer)}
    raise ValueError(f"unknown command {cmd!r}")


async def _peer_command(peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
    cmd = request["cmd"]
    timeout = float(request.get("timeout", 20))
    if cmd == "contact":
        await peer.add_contact(PeerId.from_string(request["peer"]), None, request["addrs"])
        return {}
    if cmd == "send":
        with anyio.fail_after(timeout):
            message_id = await peer.send(request["peer"], request["text"])
            row = await peer.wait_delivered(message_id)
        return {"path": row.path}
    return await host_command(peer.host, request)


@asynccontextmanager
async def _node(
    config: dict[str, Any], holepunch: HolePunchConfig
) -> AsyncIterator[tuple[Host, Handler, list[str]]]:
    """The host (alone, or a chat peer's), what answers commands, and the addresses to give."""
    listen = [f"/ip4/{config['ip']}/udp/0/quic-v1"]
    relay = {"address": config["relay"], "rest_secret": config["secret"], "keepalive": 5.0}
    if "dir" not in config:
        async with Host(
            Identity.generate(),
            listen=listen,
            relays=[RelayClientConfig(**relay, rto=0.2)],
            holepunch=holepunch,
            dial_timeout=5.0,
        ) as host:

            async def answer(request: dict[str, Any]) -> dict[str, Any]:
                return await host_command(host, request)

            yield host, answer, [str(a) for a in host.addrs]
        return
    directory = Path(config["dir"])
    settings = PeerConfig(relays=[relay], retry_interval=0.2, one_time_prekeys=8)
    kdf = KdfParams(memory_kib=8, iterations=1)
    Profile.create(directory, PASSPHRASE, kdf=kdf, config=settings).close()
    async with Peer.open(
        directory, passphrase=PASSPHRASE, listen=listen, dial_timeout=1.0, holepunch=holepunch
    ) as peer:

        async def answer_peer(request: dict[str, Any]) -> dict[str, Any]:
            return await _peer_command(peer, request)

        yield peer.host, answer_peer, [str(a) for a in peer.addrs]


async def main(config: dict[str, Any]) -> None:
    logging.basicConfig(level=config.get("log_level", "WARNING"), stream=sys.stderr)
    holepunch = HolePunchConfig(
        allow_networks=tuple(config["allow"]),
        punch_timeout=float(config.get("punch_timeout", 3.0)),
        retry_interval=float(config.get("retry_interval", 1.0)),
        max_attempts=int(config.get("max_attempts", 4)),
        min_interval=0.0,
    )
    async with _node(config, holepunch) as (host, answer, addrs):
        with anyio.fail_after(20):
            await host.wait_relayed_addrs()
            if config.get("discovery"):
                connection = await host.connect(Multiaddr(config["discovery"]))
                await host.wait_identified(connection.remote_peer.peer_id)
        assert host.holepunch is not None
        ready = {
            "event": "ready",
            "peer_id": str(host.peer_id),
            "addrs": addrs,
            "relayed": [str(a) for a in host.relayed_addrs],
            "candidates": [str(a) for a in host.holepunch.candidates()],
        }
        print(json.dumps(ready), flush=True)
        async for line in anyio.wrap_file(sys.stdin):
            if not line.strip():
                continue
            try:
                reply = {"ok": True, **await answer(json.loads(line))}
            except (TeiaError, TimeoutError, ValueError) as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]), backend="trio")
