"""Relay capacity benchmarks (issue 5): ``teia relay``, coturn's ``turnserver``, a bare forwarder.

All three run as subprocesses on 127.0.0.1 in the same run, so each one's CPU time is its own
(``utime + stime`` from ``/proc/PID/stat``), and are driven identically by ``relay-load``
(``benchmarks/relay_load/``, a small Rust crate outside the workspace, built on demand):

- this harness makes ``CLIENTS`` UDP sockets per relay and, with teia's STUN codec, allocates on
  each with long-term credentials and binds channel 0x4000 to a sink socket; one more allocation
  binds channel 0x4001 to an echo socket (the bare forwarder needs no setup: its routes are
  flags);
- it hands the sockets to a ``relay-load drive`` process, which blasts ChannelData from all the
  clients round-robin (sendmmsg, as fast as it can or paced to a rate), counts at the sink what
  the relay forwarded (recvmmsg; each step's datagrams carry a tag) and does lock-step pings
  through the echo peer;
- **saturation**: ``SATURATION_ROUNDS`` unpaced steps per relay, interleaved so each relay sees
  the same background load: relayed packets/s and CPU per relayed packet;
- **loss search**: from the relayed rate at saturation, paced steps at 100 %, 90 %, 80 % … of it
  (or 110 %, 121 % … while they stay lossless) until the highest offered rate with < 1 % loss;
  throughput per core = packets/s at that step ÷ the cores the relay used meanwhile;
- **latency at half load**: pings every millisecond while the load runs at half that rate.

Configurations: teia's data plane forwards on one thread; coturn runs with ``--relay-threads``
``COTURN_THREADS`` (default 1: one relay thread, besides its listener and authentication
threads); the bare forwarder is one thread. Every helper process exits by itself after
``TOOL_SECONDS``, and every step is bounded in time; all of them are killed in ``finally``.
Nothing here asserts a timing: the figures are printed after the module and kept in
``extra_info``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from teia.relay import stun
from teia.relay.stun import Attr, MessageBuilder, MessageClass, Method, StunMessage

REPO = Path(__file__).resolve().parents[1]
LOAD_CRATE = REPO / "benchmarks" / "relay_load"
LOAD_TARGET = REPO / "target" / "relay-load"

REALM = "teia.bench"
USER = "bench"
PASSWORD = "bench-password"
CLIENTS = 8
LOAD_CHANNEL = 0x4000
PING_CHANNEL = 0x4001
PAYLOADS = (170, 1200)
STEP_SECONDS = 1.5
SATURATION_ROUNDS = 3
SEARCH_DOWN = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
SEARCH_UP = 1.1  # factor per step while steps stay lossless
MAX_SEARCH_STEPS = 6
LOSS_LIMIT = 0.01
LATENCY_SECONDS = 2.5
LATENCY_ROUNDS = 2
PING_INTERVAL_US = 1000
TOOL_SECONDS = 900
STEP_TIMEOUT = 60.0
START_TIMEOUT = 30.0
COTURN_THREADS = os.environ.get("TEIA_BENCH_COTURN_THREADS", "1")
TEIA_NO_GSO = "teia, no GSO"
COMPARE_GSO = os.environ.get("TEIA_BENCH_RELAY_NO_GSO", "1") != "0"
"""Also run teia with ``--no-udp-gso`` (one datagram per sendmmsg message, as the bare forwarder
sends), to show what GSO is worth in the same run; ``TEIA_BENCH_RELAY_NO_GSO=0`` skips it."""

UDP_TRANSPORT = bytes([17, 0, 0, 0])


# --- one measured step -----------------------------------------------------------------------


@dataclass
class Step:
    rate: float  # offered rate asked for, datagrams/s (0: as fast as the generator goes)
    size: int
    offered: int
    received: int
    received_bytes: int
    elapsed: float
    cpu_user: float  # the relay process's CPU seconds, user and system
    cpu_system: float
    relay_drops: int  # datagrams the kernel dropped at the relay's listening socket(s)
    sink_drops: int  # … and at the sink
    rtt_ns: list[int] = field(default_factory=list)
    pings_lost: int = 0

    @property
    def loss(self) -> float:
        return 1 - self.received / self.offered if self.offered else 1.0

    @property
    def pps(self) -> float:
        return self.received / self.elapsed

    @property
    def payload_mbps(self) -> float:
        return self.received_bytes * 8 / self.elapsed / 1e6

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_system

    @property
    def cores(self) -> float:
        return self.cpu / self.elapsed

    @property
    def per_core_pps(self) -> float:
        return self.received / self.cpu if self.cpu else 0.0

    @property
    def cpu_per_packet_us(self) -> float:
        return self.cpu / self.received * 1e6 if self.received else 0.0

    @property
    def user_per_packet_us(self) -> float:
        return self.cpu_user / self.received * 1e6 if self.received else 0.0


# --- relays under test -----------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    turn: bool
    driver: subprocess.Popen[str] | None = None
    sink_port: int = 0

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _binding_answered(port: int) -> bool:
    with _udp() as sock:
        sock.settimeout(0.2)
        tid = os.urandom(12)
        sock.sendto(MessageBuilder(Method.BINDING, MessageClass.REQUEST, tid).finish(),
                    ("127.0.0.1", port))  # fmt: skip
        with contextlib.suppress(OSError):
            reply = sock.recv(2048)
            return stun.is_stun(reply) and stun.parse(reply).transaction_id == tid
    return False


def _wait_until(predicate: Any, what: str, target: Target) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not predicate():
        if target.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{target.log_tail()}")
        time.sleep(0.1)


def _start_teia(work: Path, *, gso: bool = True) -> Target:
    name = "teia" if gso else TEIA_NO_GSO
    log = work / f"{name.replace(' ', '-').replace(',', '')}-relay.log"
    command = [sys.executable, "-m", "teia", "relay", "--listen", "127.0.0.1:0",
               "--realm", REALM, "--user", f"{USER}:{PASSWORD}", "--allow-peer", "127.0.0.0/8",
               "--data-dir", str(work / "teia-relay"), "--log-format", "json",
               "--max-allocations-per-user", "64", "--max-allocations-per-ip", "64",
               "--no-tcp", *([] if gso else ["--no-udp-gso"])]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    target = Target(name, 0, process, log, turn=True)

    def ready() -> bool:
        for line in log.read_text(errors="replace").splitlines():
            if '"event": "ready"' in line:
                target.port = int(json.loads(line)["listen"].rpartition(":")[2])
                return True
        return False

    _wait_until(ready, "teia relay", target)
    return target


def _coturn() -> str:
    path = shutil.which("turnserver")
    if path is None:
        pytest.skip("turnserver is missing: scripts/bootstrap-system.sh installs coturn")
    return path


def _start_coturn(work: Path) -> Target:
    port = _free_port()
    log = work / "turnserver.log"
    command = [_coturn(), "-n", "--no-tls", "--no-dtls", "--no-tcp", "-L", "127.0.0.1",
               "--listening-port", str(port), "--relay-ip", "127.0.0.1",
               "--allow-loopback-peers", "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}",
               "--realm", REALM, "--no-cli", "--log-file", "stdout", "--simple-log",
               "--pidfile", str(work / "turnserver.pid"), "--relay-threads", COTURN_THREADS,
               "--no-software-attribute"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    target = Target(f"coturn -m {COTURN_THREADS}", port, process, log, turn=True)
    _wait_until(lambda: _binding_answered(port), "turnserver", target)
    return target


def _load_tool() -> Path:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is missing: relay-load is built from benchmarks/relay_load")
    subprocess.run(
        [cargo, "build", "--release", "--quiet", "--manifest-path", str(LOAD_CRATE / "Cargo.toml"),
         "--target-dir", str(LOAD_TARGET)],
        check=True,
        timeout=600,
    )  # fmt: skip
    return LOAD_TARGET / "release" / "relay-load"


def _start_bare(work: Path, tool: Path, routes: dict[int, int]) -> Target:
    log = work / "bare-forwarder.log"
    command = [str(tool), "forward", "--max-seconds", str(TOOL_SECONDS)]
    for channel, port in routes.items():
        command += ["--route", f"{channel}=127.0.0.1:{port}"]
    with log.open("wb") as err:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=err)  # fmt: skip
    target = Target("bare forwarder", 0, process, log, turn=False)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline().decode() if ready else ""
    if not line.startswith("ready "):
        raise RuntimeError(f"relay-load forward did not start: {line!r}\n{target.log_tail()}")
    target.port = int(line.split()[1])
    return target


# --- TURN setup with teia's codec ----------------------------------------------------------


class _TurnClient:
    """Allocate and ChannelBind with long-term credentials on one UDP socket."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.server = ("127.0.0.1", port)
        self.key = stun.long_term_key(USER, REALM, PASSWORD)
        self.nonce = ""
        self.realm = ""

    def _exchange(self, method: int, attrs: list[tuple[int, bytes]], tid: bytes) -> StunMessage:
        builder = MessageBuilder(method, MessageClass.REQUEST, tid)
        for attr, value in attrs:
            builder.add(attr, value)
        if self.nonce:
            builder.add_text(Attr.USERNAME, USER).add_text(Attr.REALM, self.realm)
            builder.add_text(Attr.NONCE, self.nonce)
        data = builder.finish(key=self.key if self.nonce else None, fingerprint=True)
        for _ in range(5):  # loopback loses nothing, but a busy machine may be slow
            self.sock.sendto(data, self.server)
            with contextlib.suppress(TimeoutError):
                while True:
                    reply = self.sock.recv(4096)
                    if stun.is_stun(reply):
                        message = stun.parse(reply)
                        if message.transaction_id == tid:
                            return message
        raise RuntimeError(f"no answer from the relay on port {self.server[1]}")

    def request(
        self, method: int, attrs: Callable[[bytes], list[tuple[int, bytes]]]
    ) -> StunMessage:
        """``attrs(transaction_id)``: XOR-PEER-ADDRESS depends on the transaction ID."""
        for _ in range(3):
            tid = os.urandom(12)
            answer = self._exchange(method, attrs(tid), tid)
            if answer.cls == MessageClass.SUCCESS:
                return answer
            code = stun.decode_error_code(answer.get(Attr.ERROR_CODE) or b"")[0]
            if code not in (401, 438):
                raise RuntimeError(f"relay answered {Method(method).name} with {code}")
            self.nonce = (answer.get(Attr.NONCE) or b"").decode()
            self.realm = (answer.get(Attr.REALM) or REALM.encode()).decode()
        raise RuntimeError("the relay kept refusing the credentials")

    def allocate(self) -> None:
        self.request(Method.ALLOCATE, lambda _: [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)])

    def bind(self, channel: int, peer_port: int) -> None:
        def attrs(tid: bytes) -> list[tuple[int, bytes]]:
            return [
                (Attr.CHANNEL_NUMBER, channel.to_bytes(2, "big") + b"\x00\x00"),
                (Attr.XOR_PEER_ADDRESS, stun.encode_xor_address("127.0.0.1", peer_port, tid)),
            ]

        self.request(Method.CHANNEL_BIND, attrs)


def _attach_driver(target: Target, tool: Path, sockets: dict[str, Any], work: Path) -> None:
    """Hand the (set-up) sockets to a ``relay-load drive`` process watching the relay's CPU."""
    clients: list[socket.socket] = sockets["clients"]
    sink, ping, echo = sockets["sink"], sockets["ping"], sockets["echo"]
    every = [*clients, sink, ping, echo]
    for sock in every:
        sock.setblocking(True)  # the flag is shared with the child: blocking there too
    command = [str(tool), "drive", "--server", f"127.0.0.1:{target.port}",
               "--clients", ",".join(str(s.fileno()) for s in clients),
               "--sink", str(sink.fileno()), "--ping", str(ping.fileno()),
               "--echo", str(echo.fileno()), "--watch", str(target.process.pid),
               "--max-seconds", str(TOOL_SECONDS)]  # fmt: skip
    err = (work / f"driver-{target.name.split()[0]}.log").open("wb")
    with err:
        target.driver = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            pass_fds=[s.fileno() for s in every],
        )
    target.sink_port = sink.getsockname()[1]
    for sock in every:
        sock.close()  # the driver owns them now


def _sockets() -> dict[str, Any]:
    return {
        "clients": [_udp() for _ in range(CLIENTS)],
        "sink": _udp(),
        "ping": _udp(),
        "echo": _udp(),
    }


def _set_up_turn(target: Target, sockets: dict[str, Any]) -> None:
    sink_port = sockets["sink"].getsockname()[1]
    echo_port = sockets["echo"].getsockname()[1]
    for sock in [*sockets["clients"], sockets["ping"]]:
        sock.settimeout(1.0)
        client = _TurnClient(sock, target.port)
        client.allocate()
        if sock is sockets["ping"]:
            client.bind(PING_CHANNEL, echo_port)
        else:
            client.bind(LOAD_CHANNEL, sink_port)


def _kill(process: subprocess.Popen[Any] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def _running_targets(work: Path) -> Iterator[list[Target]]:
    tool = _load_tool()
    targets: list[Target] = []
    try:
        starts: list[Callable[[Path], Target]] = [_start_teia, _start_coturn]
        if COMPARE_GSO:
            starts.insert(1, lambda work: _start_teia(work, gso=False))
        for start in starts:
            target = start(work)
            targets.append(target)
            sockets = _sockets()
            _set_up_turn(target, sockets)
            _attach_driver(target, tool, sockets, work)
        sockets = _sockets()
        routes = {
            LOAD_CHANNEL: sockets["sink"].getsockname()[1],
            PING_CHANNEL: sockets["echo"].getsockname()[1],
        }
        bare = _start_bare(work, tool, routes)
        targets.append(bare)
        _attach_driver(bare, tool, sockets, work)
        yield targets
    finally:
        for target in targets:
            if target.driver is not None and target.driver.stdin is not None:
                with contextlib.suppress(OSError):
                    target.driver.stdin.close()
            _kill(target.driver)
            if target.process.stdin is not None:
                with contextlib.suppress(OSError):
                    target.process.stdin.close()
            _kill(target.process)


# --- measuring -------------------------------------------------------------------------------


def _udp_drops(ports: set[int]) -> int:
    """Receive-queue drops of the local UDP sockets on ``ports`` (``/proc/net/udp``)."""
    total = 0
    with open("/proc/net/udp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) in ports:
                total += int(fields[-1])
    return total


def _run(target: Target, rate: float, size: int, seconds: float, ping: bool = False) -> Step:
    driver = target.driver
    assert driver is not None
    assert driver.stdin is not None
    assert driver.stdout is not None
    drops_before = (_udp_drops({target.port}), _udp_drops({target.sink_port}))
    command = f"run {rate:.0f} {seconds} {size}" + (f" {PING_INTERVAL_US}" if ping else "")
    driver.stdin.write(command + "\n")
    driver.stdin.flush()
    ready, _, _ = select.select([driver.stdout], [], [], STEP_TIMEOUT)
    line = driver.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"relay-load drive gave no answer for {target.name}: {command}")
    answer = json.loads(line)
    return Step(
        rate=rate,
        size=size,
        offered=answer["offered"],
        received=answer["received"],
        received_bytes=answer["received_bytes"],
        elapsed=answer["elapsed"],
        cpu_user=answer["cpu_user"],
        cpu_system=answer["cpu_system"],
        relay_drops=_udp_drops({target.port}) - drops_before[0],
        sink_drops=_udp_drops({target.sink_port}) - drops_before[1],
        rtt_ns=answer["rtt_ns"],
        pings_lost=answer["pings_lost"],
    )


def _rotated(targets: list[Target], turn: int) -> list[Target]:
    k = turn % len(targets)
    return targets[k:] + targets[:k]


@dataclass
class Capacity:
    """One relay's figures for one payload size."""

    saturated: list[Step] = field(default_factory=list)
    searched: list[Step] = field(default_factory=list)
    best: Step | None = None  # the highest-rate step under LOSS_LIMIT
    generator_bound: bool = False  # lossless even unpaced: the relay was never saturated
    latency: list[Step] = field(default_factory=list)

    def median(self, metric: str) -> float:
        return float(statistics.median(getattr(step, metric) for step in self.saturated))


def _measure(targets: list[Target], size: int) -> dict[str, Capacity]:
    figures = {t.name: Capacity() for t in targets}
    for turn in range(SATURATION_ROUNDS):
        for target in _rotated(targets, turn):
            figures[target.name].saturated.append(_run(target, 0, size, STEP_SECONDS))

    # The loss search, one step per relay per pass so the passes see the same background load.
    factor: dict[str, float | None] = {}
    going_up: dict[str, bool] = {}
    for target in targets:
        capacity = figures[target.name]
        if capacity.median("loss") < LOSS_LIMIT:
            capacity.generator_bound = True
            capacity.best = max(capacity.saturated, key=lambda s: s.pps)
            factor[target.name] = None
        else:
            factor[target.name] = SEARCH_DOWN[0]
            going_up[target.name] = False
    for turn in range(MAX_SEARCH_STEPS):
        for target in _rotated(targets, turn):
            f = factor[target.name]
            if f is None:
                continue
            capacity = figures[target.name]
            step = _run(target, capacity.median("pps") * f, size, STEP_SECONDS)
            capacity.searched.append(step)
            if step.loss < LOSS_LIMIT:
                if capacity.best is None or step.pps > capacity.best.pps:
                    capacity.best = step
                if f == SEARCH_DOWN[0] or going_up[target.name]:
                    going_up[target.name] = True
                    factor[target.name] = f * SEARCH_UP
                else:
                    factor[target.name] = None
            elif going_up[target.name]:
                factor[target.name] = None
            else:
                lower = [d for d in SEARCH_DOWN if d < f]
                factor[target.name] = lower[0] if lower else None

    for turn in range(LATENCY_ROUNDS):
        for target in _rotated(targets, turn):
            capacity = figures[target.name]
            full = capacity.best.pps if capacity.best else capacity.median("pps")
            capacity.latency.append(_run(target, full / 2, size, LATENCY_SECONDS, ping=True))
    return figures


# --- the benchmark ---------------------------------------------------------------------------

# payload size → relay → figures; printed after the module
_RESULTS: dict[int, dict[str, Capacity]] = {}
_LOAD: list[str] = []


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Target]]:
    with _running_targets(tmp_path_factory.mktemp("relay-bench")) as running:
        yield running


def _uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    return f"load average {os.getloadavg()}"


@pytest.mark.parametrize("size", PAYLOADS)
def test_relay_capacity(benchmark: Any, targets: list[Target], size: int) -> None:
    _LOAD.append(f"before {size} B: {_uptime()}")
    figures: dict[str, Capacity] = {}
    benchmark.pedantic(lambda: figures.update(_measure(targets, size)), rounds=1, iterations=1)
    _LOAD.append(f"after {size} B: {_uptime()}")
    _RESULTS[size] = figures
    for name, capacity in figures.items():
        best = capacity.best
        benchmark.extra_info[name] = {
            "saturated_pps": capacity.median("pps"),
            "saturated_cpu_us_per_packet": capacity.median("cpu_per_packet_us"),
            "max_pps_under_1pct_loss": best.pps if best else None,
            "loss_at_max": best.loss if best else None,
            "per_core_pps": best.per_core_pps if best else None,
            "generator_bound": capacity.generator_bound,
        }


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 if ordered else 0.0


def _ratio_lines(figures: dict[str, Capacity]) -> list[str]:
    teia = figures.get("teia")
    coturn = next((c for n, c in figures.items() if n.startswith("coturn")), None)
    bare = figures.get("bare forwarder")
    if not (teia and teia.best and coturn and coturn.best and bare and bare.best):
        return ["  (a relay had no step under 1 % loss: no ratios)"]
    cpu = {name: c.median("cpu_per_packet_us") for name, c in (("teia", teia),
           ("coturn", coturn), ("bare", bare))}  # fmt: skip
    lines = [
        f"  teia / coturn: per core {teia.best.per_core_pps / coturn.best.per_core_pps:.2f}x"
        f" (goal >= 2x); packets/s under 1 % loss {teia.best.pps / coturn.best.pps:.2f}x;"
        f" CPU per packet at saturation {cpu['coturn'] / cpu['teia']:.2f}x less",
        f"  teia / bare forwarder: packets/s under 1 % loss {teia.best.pps / bare.best.pps:.0%}"
        f" (goal >= 70 %); per core {teia.best.per_core_pps / bare.best.per_core_pps:.0%};"
        f" CPU per packet at saturation {cpu['bare'] / cpu['teia']:.0%}",
        f"  bound: bare forwarder / coturn per core"
        f" {bare.best.per_core_pps / coturn.best.per_core_pps:.2f}x, at saturation"
        f" {cpu['coturn'] / cpu['bare']:.2f}x; CPU per packet above the bare forwarder's:"
        f" teia {cpu['teia'] - cpu['bare']:.2f} µs, coturn {cpu['coturn'] - cpu['bare']:.2f} µs",
    ]
    plain = figures.get(TEIA_NO_GSO)
    if plain and plain.best:
        lines.append(
            f"  teia without GSO: / coturn per core"
            f" {plain.best.per_core_pps / coturn.best.per_core_pps:.2f}x, CPU per packet at"
            f" saturation {cpu['coturn'] / plain.median('cpu_per_packet_us'):.2f}x less;"
            f" / bare forwarder per core {plain.best.per_core_pps / bare.best.per_core_pps:.0%}"
        )
    return lines


def _figures_lines() -> list[str]:
    lines = []
    for size, figures in sorted(_RESULTS.items()):
        lines.append(
            f"payload {size} B ({CLIENTS} clients; coturn --relay-threads {COTURN_THREADS})"
        )
        lines.append(
            f"  {'relay':<18}{'sat. kpps':>10}{'cores':>7}{'µs CPU/pkt':>11}{'(user)':>7}"
            f"{'loss':>7}"
            f"{' | <1% kpps':>11}{'Mbit/s':>8}{'loss':>7}{'cores':>7}{'kpps/core':>10}"
            f"{' | p50 µs':>9}{'p99 µs':>8}{'lost':>6}"
        )
        for name, c in figures.items():
            best = c.best
            rtts = [rtt for step in c.latency for rtt in step.rtt_ns]
            lost = sum(step.pings_lost for step in c.latency)
            sat = (
                f"{c.median('pps') / 1e3:10.1f}{c.median('cores'):7.2f}"
                f"{c.median('cpu_per_packet_us'):11.2f}{c.median('user_per_packet_us'):7.2f}"
                f"{c.median('loss') * 100:6.1f}%"
            )
            mark = "≥" if c.generator_bound else " "
            under = (
                f" |{mark}{best.pps / 1e3:8.1f}{best.payload_mbps:8.0f}{best.loss * 100:6.2f}%"
                f"{best.cores:7.2f}{best.per_core_pps / 1e3:10.1f}"
                if best
                else " | (none under 1 %)" + " " * 25
            )
            latency = f" |{_percentile(rtts, 0.5):8.0f}{_percentile(rtts, 0.99):8.0f}{lost:6d}"
            lines.append(f"  {name:<18}{sat}{under}{latency}")
        lines.extend(_ratio_lines(figures))
        for name, c in figures.items():
            steps = ", ".join(
                f"{s.rate / 1e3:.0f}k→{s.pps / 1e3:.0f}k {s.loss * 100:.1f}%"
                f" (drops relay {s.relay_drops}, sink {s.sink_drops})"
                for s in c.searched
            )
            lines.append(f"  search {name}: {steps or 'none'}")
    lines.extend(_LOAD)
    return lines


@pytest.fixture(scope="module", autouse=True)
def _figures_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: the figures side by side, and teia's ratios against the issue's goals."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not _RESULTS or reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_sep("-", "relay figures (relay-load on loopback; CPU of the relay process)")
        for line in _figures_lines():
            reporter.write_line(line)
