"""py-libp2p's side of the transport benchmarks: two QUIC hosts in this interpreter, driven by JSON.

Runs under py-libp2p's own virtualenv (``.venv-libp2p``), started by
``benchmarks/test_transport.py``. On start it prints one JSON line ``{"ready": true, ...}``;
then it reads one JSON command per line on stdin and answers each with one JSON line, the time
measured here, in this process:

- ``{"op": "transfer", "size": N, "chunk": C}``: host A sends N bytes in C-byte writes on a
  ``/teia/bench/sink/1.0.0`` stream to host B; seconds until B's one-byte receipt is back;
- ``{"op": "round_trips", "count": K}``: K one-byte request/responses on a
  ``/teia/bench/echo/1.0.0`` stream; seconds for all K;
- ``{"op": "dials", "count": K}``: host C dials B K times (QUIC handshake, then one stream
  negotiated and one byte echoed, then disconnect); seconds for all K.

Each of these two opens its stream (on A's open connection) before its clock starts and closes
it after: py-libp2p resets a stream that sits unread for its read timeout, as these would between
rounds. Answers are ``{"seconds": t, "cpu_seconds": c}`` (wall clock; CPU time of this
process, where both ends run) or ``{"error": "..."}``. End of input,
``{"op": "quit"}`` or the lifetime cap ends it. The wire protocols match the teia side of the
benchmark: a sink stream carries, per round, an 8-byte big-endian length and that many bytes,
answered with one byte.
"""
# mypy: ignore-errors

from __future__ import annotations

import json
import os
import time

# Stray prints from the library would corrupt the answers: keep the real stdout for them alone.
_ANSWERS = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

import multiaddr  # noqa: E402
import trio  # noqa: E402
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402

SINK = "/teia/bench/sink/1.0.0"
ECHO = "/teia/bench/echo/1.0.0"
LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"
READ_SIZE = 65536
OP_TIMEOUT = 120.0  # seconds any one command may take
LIFETIME = 900.0  # seconds this process may live at all
MAX_COMMANDS = 10_000
MAX_ROUNDS = 100_000  # per stream, on the serving side
MAX_LINE = 4096


def answer(message: dict[str, object]) -> None:
    _ANSWERS.write(json.dumps(message) + "\n")


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> dict[str, float]:
    """Wall-clock seconds, and this process's CPU seconds (both hosts run in it)."""
    return {
        "seconds": time.perf_counter() - start[0],
        "cpu_seconds": time.process_time() - start[1],
    }


async def read_exactly(stream, count: int) -> bytes:
    data = bytearray()
    for _ in range(count + 1):  # each read yields at least one byte or fails
        if len(data) >= count:
            return bytes(data)
        chunk = await stream.read(count - len(data))
        if not chunk:
            raise EOFError("stream ended early")
        data += chunk
    return bytes(data)


async def serve_sink(stream) -> None:
    try:
        for _ in range(MAX_ROUNDS):
            size = int.from_bytes(await read_exactly(stream, 8), "big")
            received = 0
            while received < size:  # bounded: every read returns at least one byte
                chunk = await stream.read(min(READ_SIZE, size - received))
                if not chunk:
                    raise EOFError("stream ended early")
                received += len(chunk)
            await stream.write(b"\x01")
    except Exception:  # the benchmark closed the stream: nothing more to serve
        pass
    finally:
        await stream.close()


async def serve_echo(stream) -> None:
    try:
        for _ in range(MAX_ROUNDS):
            data = await stream.read(READ_SIZE)
            if not data:
                return
            await stream.write(data)
    except Exception:
        pass
    finally:
        await stream.close()


async def transfer(host, info, size: int, chunk_size: int) -> dict[str, float]:
    payload = os.urandom(chunk_size)
    stream = await host.new_stream(info.peer_id, [SINK])
    start = clock()
    await stream.write(size.to_bytes(8, "big"))
    sent = 0
    while sent < size:  # bounded by size / chunk_size
        piece = payload[: min(chunk_size, size - sent)]
        await stream.write(piece)
        sent += len(piece)
    await read_exactly(stream, 1)
    timing = since(start)
    await stream.close()
    return timing


async def round_trips(host, info, count: int) -> dict[str, float]:
    stream = await host.new_stream(info.peer_id, [ECHO])
    start = clock()
    for _ in range(count):
        await stream.write(b"x")
        await read_exactly(stream, 1)
    timing = since(start)
    await stream.close()
    return timing


async def dials(dialer, info, count: int) -> dict[str, float]:
    start = clock()
    for _ in range(count):
        await dialer.connect(info)
        stream = await dialer.new_stream(info.peer_id, [ECHO])
        await stream.write(b"x")
        await read_exactly(stream, 1)
        await dialer.disconnect(info.peer_id)
    return since(start)


def p2p_info(host):
    port = host.get_addrs()[0].value_for_protocol("udp")
    address = f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{host.get_id().to_string()}"
    return info_from_p2p_addr(multiaddr.Multiaddr(address))


async def commands(stdin: trio.lowlevel.FdStream):
    buffered = b""
    for _ in range(MAX_COMMANDS):
        while b"\n" not in buffered:
            if len(buffered) > MAX_LINE:
                raise ValueError("command line too long")
            data = await stdin.receive_some(MAX_LINE)
            if not data:
                return
            buffered += data
        line, buffered = buffered.split(b"\n", 1)
        yield json.loads(line)


async def main() -> None:
    listen = [multiaddr.Multiaddr(LISTEN)]
    a, b, c = (new_host(key_pair=create_new_key_pair(), listen_addrs=listen) for _ in range(3))
    b.set_stream_handler(SINK, serve_sink)
    b.set_stream_handler(ECHO, serve_echo)
    with trio.fail_after(LIFETIME):
        async with (
            a.run(listen_addrs=listen),
            b.run(listen_addrs=listen),
            c.run(listen_addrs=listen),
        ):
            target = p2p_info(b)
            with trio.fail_after(OP_TIMEOUT):
                await a.connect(target)
            answer({"ready": True, "libp2p": _version("libp2p"), "aioquic": _version("aioquic")})
            stdin = trio.lowlevel.FdStream(os.dup(0))
            async for command in commands(stdin):
                op = command.get("op")
                try:
                    with trio.fail_after(OP_TIMEOUT):
                        if op == "transfer":
                            timing = await transfer(a, target, command["size"], command["chunk"])
                        elif op == "round_trips":
                            timing = await round_trips(a, target, command["count"])
                        elif op == "dials":
                            timing = await dials(c, target, command["count"])
                        elif op == "quit":
                            break
                        else:
                            raise ValueError(f"unknown op {op!r}")
                except Exception as exc:
                    answer({"error": f"{type(exc).__name__}: {exc}"})
                    continue
                answer(timing)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    trio.run(main)
