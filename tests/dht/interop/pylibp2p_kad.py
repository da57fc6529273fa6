"""A py-libp2p kad-dht peer for the DHT interop tests (run under py-libp2p's own interpreter).

Usage:

- ``python pylibp2p_kad.py find-node <multiaddr> <key-hex>...`` connects over QUIC-v1 to the
  DHT node at ``<multiaddr>`` (``…/p2p/<id>``) and sends it one FIND_NODE per key, each on its
  own ``/ipfs/kad/1.0.0`` stream, built and framed exactly as py-libp2p's own lookup does (its
  protobuf ``Message``, its ``senderRecord``, its varint prefix and size-limited reader). Prints
  ``CLOSER <json>`` per key: the answer's type, key and closer peers (base58 IDs, multiaddrs as
  py-libp2p parses them, connection type), then exits 0.
- ``python pylibp2p_kad.py find-peer <multiaddr> <peer-id>`` runs py-libp2p's own ``KadDHT``
  in client mode, connected only to ``<multiaddr>``, and asks ``find_peer``: its iterative
  lookup through the teia nodes. Prints ``FOUND <json>`` (the addresses, or null), exits 0.
- ``python pylibp2p_kad.py serve <multiaddr>...`` runs a ``KadDHT`` server that knows the DHT
  nodes at the given addresses (connected, in its routing table), prints
  ``PEER <peer-id> <udp-port>`` and serves for 60 s.
"""
# mypy: ignore-errors

import json
import sys

import multiaddr
import trio
import varint
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

TIMEOUT = 30


def _peer_summary(peer: Message.Peer) -> dict:
    return {
        "id": ID(peer.id).to_base58(),
        "addrs": [str(multiaddr.Multiaddr(a)) for a in peer.addrs],
        "connection": int(peer.connection),
    }


async def find_node(host, target: str, keys: list[bytes]) -> None:
    info = info_from_p2p_addr(multiaddr.Multiaddr(target))
    await host.connect(info)
    for key in keys:
        stream = await host.new_stream(info.peer_id, [PROTOCOL_ID])
        request = Message()
        request.type = Message.MessageType.FIND_NODE
        request.key = key
        request.senderRecord, _ = env_to_send_in_RPC(host)
        payload = request.SerializeToString()
        await stream.write(varint.encode(len(payload)) + payload)
        data = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
        await stream.close()
        response = Message()
        response.ParseFromString(data)
        summary = {
            "type": int(response.type),
            "key": response.key.hex(),
            "closer": [_peer_summary(p) for p in response.closerPeers],
        }
        print("CLOSER", json.dumps(summary), flush=True)


async def find_peer(host, target: str, peer: str) -> None:
    info = info_from_p2p_addr(multiaddr.Multiaddr(target))
    await host.connect(info)
    dht = KadDHT(host, DHTMode.CLIENT)
    found = await dht.find_peer(ID.from_base58(peer))
    addrs = None if found is None else [str(a) for a in found.addrs]
    print("FOUND", json.dumps(addrs), flush=True)


async def serve(host, targets: list[str]) -> None:
    dht = KadDHT(host, DHTMode.SERVER)
    with trio.fail_after(TIMEOUT):
        for target in targets:
            info = info_from_p2p_addr(multiaddr.Multiaddr(target))
            await host.connect(info)
            # The teia nodes are DHT servers; no need to wait for identify to say so.
            await dht.add_peer(info.peer_id, skip_server_mode_check=True)
    port = host.get_addrs()[0].value_for_protocol("udp")
    print("PEER", host.get_id().to_string(), port, flush=True)
    with trio.move_on_after(60):
        await trio.sleep_forever()


async def main() -> None:
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")]
    host = new_host(key_pair=create_new_key_pair(), listen_addrs=listen)
    command, args = sys.argv[1], sys.argv[2:]
    async with host.run(listen_addrs=listen):
        if command == "serve":
            await serve(host, args)
            return
        with trio.fail_after(TIMEOUT):
            if command == "find-node":
                await find_node(host, args[0], [bytes.fromhex(k) for k in args[1:]])
            elif command == "find-peer":
                await find_peer(host, args[0], args[1])
            else:
                raise SystemExit(f"unknown command {command!r}")


trio.run(main)
