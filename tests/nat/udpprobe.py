"""UDP helpers the lab's self-test runs inside namespaces (plain sockets, bounded waits).

``reflect IP:PORT …`` answers every datagram with the address it came from (``ip:port``),
prints ``ready`` once bound and stops when its stdin closes. ``probe IP:PORT …`` sends from
one socket to each reflector and prints, as JSON, what each of them saw (null when no answer
came within a second and a half, three tries, or there is no route).
"""

from __future__ import annotations

import json
import select
import socket
import sys

_TRIES = 3
_WAIT = 0.5


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def reflect(addresses: list[str]) -> None:
    sockets = []
    for text in addresses:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(_address(text))
        sockets.append(sock)
    print("ready", flush=True)
    while True:
        readable = select.select([*sockets, sys.stdin], [], [])[0]
        if sys.stdin in readable and not sys.stdin.readline():
            return
        for sock in sockets:
            if sock in readable:
                _, peer = sock.recvfrom(2048)
                sock.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)


def probe(targets: list[str]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    seen: dict[str, str | None] = {}
    for text in targets:
        target = _address(text)
        seen[text] = None
        for _ in range(_TRIES):
            try:
                sock.sendto(b"probe", target)
            except OSError:  # no route to it: as unanswered as a dropped datagram
                break
            readable, _, _ = select.select([sock], [], [], _WAIT)
            if readable:
                data, source = sock.recvfrom(2048)
                if source == target:
                    seen[text] = data.decode()
                    break
    print(json.dumps({"local_port": sock.getsockname()[1], "seen": seen}), flush=True)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"reflect": reflect, "probe": probe}[mode](rest)
