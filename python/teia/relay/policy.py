"""Relay policy: where a relay may send, and how much each user and address may take.

No open relay, ever: a peer address is allowed only if it is globally routable unicast
(``ipaddress``'s ``is_global``, which already excludes loopback, RFC 1918/4193 private,
link-local, shared CGNAT space, documentation and reserved ranges), is not multicast, is not
one of the relay's own addresses, and does not smuggle a forbidden IPv4 address inside IPv6
(IPv4-mapped, 6to4, NAT64) — unless the operator allow-lists it with a CIDR (tests allow
127.0.0.0/8 this way). Permissions in TURN are per IP address, so the policy is too.

One exception needs the port: a peer that is a live relayed allocation of this very relay
(two clients of one relay reaching each other's relayed addresses) is allowed on the relay's
own address without allow-listing it — and no other port there, which is why the caller, who
knows the allocations, says so (``relayed_here``), and the data plane checks the port of every
datagram to or from the relay's own addresses (``RelayPolicy.guarded_own_ips``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["RelayPolicy", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or bare addresses) → networks; `ValueError` names the one that is wrong."""
    networks = []
    for text in cidrs:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP network (CIDR like 203.0.113.0/24)") from None
    return tuple(networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(address.packed[-4:])
    return None


@dataclass(frozen=True)
class RelayPolicy:
    """Peer filtering and quotas. Zero means "no limit" for the quotas."""

    allow_peers: tuple[IPNetwork, ...] = ()
    """Networks relayed to even if the default rules forbid them (e.g. 127.0.0.0/8 in tests)."""
    deny_peers: tuple[IPNetwork, ...] = ()
    """Networks never relayed to, whatever else says (checked first)."""
    relay_addresses: frozenset[IPAddress] = field(default_factory=frozenset)
    """The relay's own addresses: forbidden unless allow-listed (no loops through ourselves)."""
    max_allocations: int = 10_000
    max_allocations_per_user: int = 32
    max_allocations_per_ip: int = 32
    max_permissions_per_allocation: int = 64
    max_channels_per_allocation: int = 64
    bandwidth_per_allocation: int = 0
    """Bytes per second each allocation may relay (both directions); 0 = unlimited."""

    def peer_allowed(self, ip: str, *, relayed_here: bool = False) -> bool:
        """Whether the relay may send to (and accept from) ``ip``. ``relayed_here``: the peer
        (IP and port) is a live relayed allocation of this relay, which admits it unless
        deny-listed."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            return False
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                candidates.append(embedded)
        if any(c in network for c in candidates for network in self.deny_peers):
            return False
        if relayed_here or any(c in network for c in candidates for network in self.allow_peers):
            return True
        return all(
            c.is_global and not c.is_multicast and c not in self.relay_addresses for c in candidates
        )

    def guarded_own_ips(self) -> list[str]:
        """The relay's own addresses that peers may be at only as live relayed allocations:
        those the operator did not allow-list (an unspecified one, standing for every local
        address, counts as allow-listed when its family's loopback is)."""
        guarded = []
        for address in sorted(self.relay_addresses, key=str):
            probe = address
            if address.is_unspecified:
                probe = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
            if not any(probe in network for network in self.allow_peers):
                guarded.append(str(address))
        return guarded
