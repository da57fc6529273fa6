"""``teia discovery`` (a Kademlia DHT / bootstrap node) and ``teia lookup`` (find a peer).

A discovery node is a DHT server: it answers ``/ipfs/kad/1.0.0`` requests, holds signed peer
records, and keeps its routing table and records in ``DATA_DIR/dht.db`` (SQLite) so it comes
back from a restart knowing the network. Several discovery nodes name each other with
``--bootstrap`` and form a redundant set: a node that starts before the others keeps trying
to reach them, and any one of them is enough for a peer to join.

Its identity lives in ``DATA_DIR/discovery-identity.key`` (created 0600 on first start), so
the peer ID that peers configure as a bootstrap address survives restarts.

Metrics (metadata only): routing-table size, stored records, connections, requests served by
type, refusals by reason, lookups and their latency, outbound failures, records published.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from teia.dht.core import DhtConfig, LookupResult, Mode
from teia.dht.node import DhtMetrics, DhtNode, DhtTiming
from teia.dht.storage import DhtStore
from teia.errors import DhtError, InvalidPeerId, TeiaError
from teia.host.host import Host
from teia.identity import Identity, Multiaddr, PeerId
from teia.service import ServiceConfig, ServiceContext, add_arguments, setting
from teia.service.checks import (
    announce_address,
    dht_node_address,
    positive,
    quic_listen_address,
)
from teia.service.identity import node_identity
from teia.service.logs import fields
from teia.service.runner import main

__all__ = ["DiscoveryConfig", "register", "serve"]

_IDENTITY_FILE = "discovery-identity.key"
_DATABASE_FILE = "dht.db"
_BOOTSTRAP_RETRY_S = 30.0


@dataclass
class DiscoveryConfig(ServiceConfig):
    listen: list[str] = setting(
        ["/ip4/0.0.0.0/udp/4001/quic-v1"], "QUIC listen address", metavar="MULTIADDR",
        check=quic_listen_address,
    )  # fmt: skip
    bootstrap: list[str] = setting(
        [],
        "another discovery node (…/quic-v1/p2p/<id>)",
        metavar="MULTIADDR",
        check=dht_node_address,
    )
    announce: list[str] = setting(
        [], "address to publish instead of the listen addresses (e.g. the public one)",
        metavar="MULTIADDR", check=announce_address,
    )  # fmt: skip
    data_dir: Path = setting(Path("/var/lib/teia/discovery"), "state directory", metavar="DIR")
    k: int = setting(20, "bucket size and replication factor", check=positive)
    request_timeout: float = setting(10.0, "seconds one DHT request may take", check=positive)
    record_ttl: int = setting(7200, "seconds this node's own record lives", check=positive)
    max_records: int = setting(100_000, "signed records held at most", check=positive)

    identity_file: ClassVar[str | None] = _IDENTITY_FILE


class _DhtCollector(Collector):
    """Reads the node's counters at scrape time (no bookkeeping on the request path)."""

    def __init__(self, node: DhtNode) -> None:
        self._node = node

    def collect(self) -> Iterator[Any]:
        node, metrics = self._node, self._node.metrics
        yield GaugeMetricFamily(
            "teia_dht_routing_table_peers", "peers in the routing table", node.routing_table_size
        )
        yield GaugeMetricFamily("teia_dht_records", "signed records held", node.stored_records)
        yield GaugeMetricFamily(
            "teia_dht_connections", "open QUIC connections", len(node.host.connections)
        )
        requests = CounterMetricFamily(
            "teia_dht_requests", "inbound requests answered", labels=["type"]
        )
        for kind, count in sorted(metrics.requests.items()):
            requests.add_metric([kind], count)
        yield requests
        refused = CounterMetricFamily(
            "teia_dht_refused", "inbound requests refused", labels=["reason"]
        )
        for reason, count in sorted(metrics.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily("teia_dht_lookups", "lookups run", value=metrics.lookups)
        yield CounterMetricFamily(
            "teia_dht_lookups_empty", "lookups that found no peer", value=metrics.lookups_empty
        )
        yield CounterMetricFamily(
            "teia_dht_outbound_failures",
            "outbound requests that failed",
            value=metrics.outbound_failures,
        )
        yield CounterMetricFamily(
            "teia_dht_records_published",
            "times this node published its own record",
            value=metrics.records_published,
        )


def _settings(config: DiscoveryConfig) -> tuple[DhtConfig, DhtTiming]:
    timeout_ms = int(config.request_timeout * 1000)
    dht = DhtConfig(k=config.k, request_timeout_ms=timeout_ms, max_records=config.max_records)
    timing = DhtTiming(request_timeout_s=config.request_timeout, record_ttl_s=config.record_ttl)
    return dht, timing


async def _keep_bootstrapping(ctx: ServiceContext, node: DhtNode, addrs: list[str]) -> None:
    """Join through the other discovery nodes; retry while none answers (they may start later)."""
    while True:
        try:
            reached = await node.bootstrap(addrs)
        except DhtError as exc:
            ctx.log.warning("bootstrap failed; retrying", extra=fields(reason=str(exc)))
        else:
            ctx.log.info("joined", extra=fields(bootstrap_reached=reached))
            await node.publish_record(_announced(ctx))
            return
        await anyio.sleep(_BOOTSTRAP_RETRY_S)


def _announced(ctx: ServiceContext) -> list[Multiaddr] | None:
    config = ctx.config
    assert isinstance(config, DiscoveryConfig)
    return [Multiaddr(a) for a in config.announce] or None


async def serve(ctx: ServiceContext) -> None:
    """The service body: serve until cancelled."""
    config = ctx.config
    assert isinstance(config, DiscoveryConfig)
    dht_config, timing = _settings(config)
    identity = node_identity(config.data_dir, _IDENTITY_FILE)
    latency = Histogram(
        "teia_dht_lookup_seconds",
        "duration of lookups run by this node",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        registry=ctx.registry,
    )

    def observe(seconds: float, result: LookupResult) -> None:
        latency.observe(seconds)

    metrics = DhtMetrics(on_lookup=observe)
    with DhtStore(config.data_dir / _DATABASE_FILE, max_records=config.max_records) as store:
        async with (
            Host(identity, listen=config.listen) as host,
            DhtNode(
                host,
                mode=Mode.SERVER,
                config=dht_config,
                timing=timing,
                store=store,
                metrics=metrics,
            ) as node,
        ):
            ctx.registry.register(_DhtCollector(node))
            ctx.ready(
                peer_id=str(identity.peer_id),
                listen=",".join(str(a) for a in host.addrs),
                routing_table=node.routing_table_size,
                records=node.stored_records,
            )
            async with anyio.create_task_group() as tg:
                if config.bootstrap:
                    tg.start_soon(_keep_bootstrapping, ctx, node, list(config.bootstrap))
                else:
                    await node.publish_record(_announced(ctx))
                await anyio.sleep_forever()


def _run_discovery(args: argparse.Namespace) -> int:
    return main("discovery", DiscoveryConfig, args, serve)


# --- teia lookup ------------------------------------------------------------------------------


def _run_lookup(args: argparse.Namespace) -> int:
    try:
        target = PeerId.from_string(args.peer_id)
    except InvalidPeerId as exc:
        raise TeiaError(f"not a peer ID: {exc}") from None
    bootstrap = [Multiaddr(a) for a in args.bootstrap]
    if not bootstrap:
        raise TeiaError("give at least one --bootstrap MULTIADDR (a discovery node)")
    family = "ip6" if all(a.protocols[0] in ("ip6", "dns6") for a in bootstrap) else "ip4"
    listen = ["/ip6/::/udp/0/quic-v1"] if family == "ip6" else ["/ip4/0.0.0.0/udp/0/quic-v1"]

    async def main() -> dict[str, Any]:
        with anyio.fail_after(args.timeout):
            async with (
                Host(Identity.generate(), listen=listen) as host,
                DhtNode(host, mode=Mode.CLIENT) as node,
            ):
                await node.bootstrap(bootstrap)
                record = await node.get_record(target)
                addrs = await node.find_peer(target) if record is None else record.record.addrs
                report: dict[str, Any] = {
                    "peer_id": str(target),
                    "addrs": [str(a) for a in addrs],
                    "record": None,
                }
                if record is not None:
                    report["record"] = {
                        "seq": record.seq,
                        "protocols": list(record.record.protocols),
                        "issued_at_ms": record.record.issued_at_ms,
                        "ttl_s": record.record.ttl_s,
                    }
                return report

    logging.getLogger("quic").setLevel(logging.CRITICAL)
    try:
        report = anyio.run(main, backend="trio")
    except TimeoutError:
        print(f"teia lookup: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        errors, _ = group.split(TeiaError)
        if errors is None:
            raise
        first: BaseException = errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    if args.json:
        print(json.dumps(report))
    elif not report["addrs"]:
        print(f"{target}: not found", file=sys.stderr)
    else:
        for addr in report["addrs"]:
            print(addr)
        if report["record"] is not None:
            rec = report["record"]
            print(
                f"record: seq {rec['seq']}, ttl {rec['ttl_s']} s, {len(rec['protocols'])} protocols"
            )
    return 0 if report["addrs"] else 1


def register(sub: Any) -> None:
    """Register ``teia discovery`` and ``teia lookup`` on the top-level subparsers."""
    parser = sub.add_parser(
        "discovery",
        help="run a discovery node (Kademlia DHT server and bootstrap node)",
        description="Answer libp2p kad-dht requests (/ipfs/kad/1.0.0), hold signed peer "
        "records, and keep the routing table and records in DATA_DIR across restarts. Name "
        "the other discovery nodes with --bootstrap to form a redundant set.",
    )
    add_arguments(parser, DiscoveryConfig)
    parser.set_defaults(handler=_run_discovery)

    lookup = sub.add_parser(
        "lookup",
        help="find a peer's addresses in the DHT",
        description="Join the DHT through a discovery node (as a client, with a throwaway "
        "identity) and print the addresses of PEER_ID from its signed record.",
    )
    lookup.add_argument("peer_id", metavar="PEER_ID")
    lookup.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a discovery node (…/quic-v1/p2p/<id>); repeatable",
    )
    lookup.add_argument("--json", action="store_true", help="print one JSON object")
    lookup.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    lookup.set_defaults(handler=_run_lookup)
