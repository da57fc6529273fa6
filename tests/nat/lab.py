"""A NAT lab made of network namespaces: a public segment, and private sites behind NAT routers.

Everything lives in namespaces this module creates (names unique per run, all starting with
the lab's prefix) and links only to each other: nothing is attached to the namespace the tests
run in, so no packet of the lab can leave it. Addresses come from 198.18.0.0/15 (RFC 2544's
benchmarking range)::

    public segment  <prefix>pub   bridge br0 198.18.0.0/24
                                  198.18.0.1 relay, 198.18.0.2 discovery, 198.18.0.3 spare
    site N router   <prefix>rN    wan0 198.18.0.(10+N)/24  lan0 198.19.N.1/24
    site N host     <prefix>hN    eth0 198.19.N.2/24, default route via 198.19.N.1

A router masquerades what leaves wan0 and lets in only what answers a flow from inside
(address-and-port-dependent filtering, as home routers do). Its mapping is one of:

- `NatKind.CONE`: endpoint-independent mapping — MASQUERADE without ``--random`` keeps the
  inside source port whenever it is free, so one inside socket appears at the same public
  address and port to every destination;
- `NatKind.SYMMETRIC`: ``MASQUERADE --random-fully`` — every new destination gets a fresh
  random public port, so what one server observes says nothing about what the next will see.

Unsolicited inbound packets are dropped in the filter table. That matters beyond realism: a
dropped packet's conntrack entry is never confirmed, so a hole punch arriving a moment before
the inside's own packet leaves no entry behind that would make the NAT pick another port for
the inside's flow.

`NatLab.block` / `unblock` add and remove a firewall rule on a router that drops traffic to and
from one address (a direct path that "appears later" once unblocked).

Tools: iproute2 (``ip netns``, veth, bridge) and iptables (any backend); root is needed.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass

__all__ = ["DISCOVERY_IP", "LAB_NETWORK", "RELAY_IP", "SPARE_IP", "NatKind", "NatLab", "Site"]

LAB_NETWORK = "198.18.0.0/15"
RELAY_IP = "198.18.0.1"
DISCOVERY_IP = "198.18.0.2"
SPARE_IP = "198.18.0.3"
_PUBLIC_PREFIX = 24
_MAX_SITES = 50
_COMMAND_TIMEOUT = 20.0


class LabError(RuntimeError):
    """A lab command failed (the message carries the command and its stderr)."""


class NatKind(enum.Enum):
    CONE = "cone"
    SYMMETRIC = "symmetric"


@dataclass(frozen=True)
class Site:
    """A private network behind one NAT router, with one host in it."""

    index: int
    kind: NatKind
    router: str
    """Namespace of the NAT router."""
    host: str
    """Namespace of the host behind it (where peers run)."""
    public_ip: str
    private_ip: str


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
    )
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class NatLab:
    """Namespaces for one test: `create`, `add_site` as needed, `destroy` (always).

    Use as a context manager; `destroy` also runs when `create` fails half way. Every
    namespace it made is deleted, after the processes still running in it are killed.
    """

    def __init__(self, tag: str = "") -> None:
        label = "".join(ch for ch in tag.lower() if ch.isalnum())[:8]
        self.prefix = f"tn{os.getpid() % 100000}{secrets.token_hex(2)}{label}-"
        self.public = f"{self.prefix}pub"
        self.sites: list[Site] = []
        self._namespaces: list[str] = []

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> NatLab:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.destroy()

    def create(self) -> None:
        """The public segment: a bridge with the services' addresses on it."""
        ns = self._add_namespace(self.public)
        self._ip(ns, "link", "add", "br0", "type", "bridge")
        for address in (RELAY_IP, DISCOVERY_IP, SPARE_IP):
            self._ip(ns, "addr", "add", f"{address}/{_PUBLIC_PREFIX}", "dev", "br0")
        self._ip(ns, "link", "set", "br0", "up")

    def destroy(self) -> None:
        """Kill what runs in the lab's namespaces and delete them (best effort, never raises)."""
        for ns in reversed(self._namespaces):
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()

    def namespaces(self) -> list[str]:
        """The namespaces of this lab that exist right now (for the clean-up check)."""
        listed = _run("ip", "netns", "list").stdout.split("\n")
        return [line.split()[0] for line in listed if line.startswith(self.prefix)]

    # --- sites ----------------------------------------------------------------------------

    def add_site(self, kind: NatKind) -> Site:
        """A NAT router on the public segment and a host behind it."""
        index = len(self.sites) + 1
        if index > _MAX_SITES:
            raise LabError(f"at most {_MAX_SITES} sites")
        router = self._add_namespace(f"{self.prefix}r{index}")
        host = self._add_namespace(f"{self.prefix}h{index}")
        public_ip = f"198.18.0.{10 + index}"
        private_ip = f"198.19.{index}.2"
        gateway = f"198.19.{index}.1"
        # The wire to the public bridge, then the wire to the host: both made from inside the
        # lab, so no interface ever exists in the namespace the tests run in.
        self._ip(self.public, "link", "add", f"s{index}", "type", "veth", "peer", "name", "wan0")
        self._ip(self.public, "link", "set", "wan0", "netns", router)
        self._ip(self.public, "link", "set", f"s{index}", "master", "br0", "up")
        self._ip(router, "addr", "add", f"{public_ip}/{_PUBLIC_PREFIX}", "dev", "wan0")
        self._ip(router, "link", "set", "wan0", "up")
        self._ip(router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0")
        self._ip(router, "link", "set", "eth0", "netns", host)
        self._ip(router, "addr", "add", f"{gateway}/24", "dev", "lan0")
        self._ip(router, "link", "set", "lan0", "up")
        self._ip(host, "addr", "add", f"{private_ip}/24", "dev", "eth0")
        self._ip(host, "link", "set", "eth0", "up")
        self._ip(host, "route", "add", "default", "via", gateway)
        self._exec(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"]
        if kind is NatKind.SYMMETRIC:
            masquerade.append("--random-fully")
        self._iptables(router, *masquerade)
        for chain in ("FORWARD", "INPUT"):
            self._iptables(
                router, "-A", chain, "-i", "wan0", "-m", "conntrack",
                "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT",
            )  # fmt: skip
            self._iptables(router, "-A", chain, "-i", "wan0", "-j", "DROP")
        site = Site(index, kind, router, host, public_ip, private_ip)
        self.sites.append(site)
        return site

    def block(self, site: Site, address: str) -> None:
        """Drop everything between ``site`` and ``address`` at the site's router."""
        self._iptables(site.router, "-I", "FORWARD", "-d", address, "-j", "DROP")
        self._iptables(site.router, "-I", "FORWARD", "-s", address, "-j", "DROP")

    def unblock(self, site: Site, address: str) -> None:
        """Undo `block`."""
        self._iptables(site.router, "-D", "FORWARD", "-d", address, "-j", "DROP")
        self._iptables(site.router, "-D", "FORWARD", "-s", address, "-j", "DROP")

    # --- running things ---------------------------------------------------------------------

    @staticmethod
    def command(ns: str, *args: str) -> list[str]:
        """``args`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *args]

    # --- internals --------------------------------------------------------------------------

    def _add_namespace(self, name: str) -> str:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _run("ip", "-n", ns, *args)

    @staticmethod
    def _exec(ns: str, *args: str) -> None:
        _run("ip", "netns", "exec", ns, *args)

    @staticmethod
    def _iptables(ns: str, *args: str) -> None:
        _run("ip", "netns", "exec", ns, "iptables", "-w", "5", *args)
