"""A py-libp2p QUIC peer for interop tests (run by the interop test under another interpreter).

Usage: ``python pylibp2p_peer.py listen`` prints ``PEER <peer-id> <udp-port>`` and serves ping
and identify for 60 s; ``python pylibp2p_peer.py dial <multiaddr>`` connects, pings three
times, prints ``PINGED``, identifies the remote, prints ``IDENTIFIED <json>`` (what py-libp2p
parsed) and exits 0.
"""
# mypy: ignore-errors

import json
import sys

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.ping import ID as PING_ID
from libp2p.host.ping import PingService, handle_ping
from libp2p.identity.identify.identify import ID as IDENTIFY_ID
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.peer.peerinfo import info_from_p2p_addr


def _complete(data: bytes) -> bool:
    length, shift = 0, 0
    for index, byte in enumerate(data):
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return len(data) >= index + 1 + length
    return False


async def main() -> None:
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")]
    host = new_host(key_pair=create_new_key_pair(), listen_addrs=listen)
    host.set_stream_handler(PING_ID, handle_ping)
    async with host.run(listen_addrs=listen):
        if sys.argv[1] == "dial":
            info = info_from_p2p_addr(multiaddr.Multiaddr(sys.argv[2]))
            with trio.fail_after(30):
                await host.connect(info)
                await PingService(host).ping(info.peer_id, ping_amt=3)
            print("PINGED", flush=True)
            with trio.fail_after(30):
                stream = await host.new_stream(info.peer_id, [IDENTIFY_ID])
                response = b""
                # Read the varint-prefixed message (py-libp2p raises once a stream is closed
                # both ways rather than returning b"", so stop as soon as it is complete).
                while not _complete(response):
                    response += await stream.read()
                await stream.close()
            identify = parse_identify_response(response)
            summary = {
                "protocols": list(identify.protocols),
                "agent_version": identify.agent_version,
                "listen_addrs": [str(multiaddr.Multiaddr(a)) for a in identify.listen_addrs],
                "observed_addr": str(multiaddr.Multiaddr(identify.observed_addr)),
                "public_key": identify.public_key.hex(),
            }
            print("IDENTIFIED", json.dumps(summary), flush=True)
            return
        port = host.get_addrs()[0].value_for_protocol("udp")
        print("PEER", host.get_id().to_string(), port, flush=True)
        with trio.move_on_after(60):
            await trio.sleep_forever()


trio.run(main)
