"""``teia store``: the store-and-forward node as a service.

Settings come from flags and ``--config FILE`` (TOML, the same names: ``listen = [...]``,
``bootstrap = [...]``, ``peer = [...]``, ``data-dir``, ``max-ttl-days`` …). The node's identity
lives in ``DATA_DIR/store-identity.key`` (a libp2p private-key protobuf, created 0600 on first
start), its database in ``DATA_DIR/store.db``.

Membership (which store nodes exist, so which R of them hold each inbox), one of:

- **DHT** (``--bootstrap``, DHT nodes such as discovery nodes): the node joins the DHT as a
  server (routing table and records kept in ``DATA_DIR/dht.db``), publishes its signed peer
  record listing ``/teia/store/1.0.0`` (with ``--announce`` addresses, or the listen
  addresses), keeps trying while no bootstrap node answers, and finds the other store nodes
  by their records (`teia.store.membership.DhtMembership`), re-checked every
  ``membership-interval`` seconds; a change starts an anti-entropy round.
- **static** (``--peer``, the other store nodes ``…/quic-v1/p2p/<id>``): with this node they
  form a fixed membership (`teia.store.membership.StaticMembership`).

Metrics (metadata only): envelopes stored / replicated / delivered / deleted / expired /
fetched, bytes stored, refusals by reason, requests by kind and status, batch sizes and
commit times, and gauges of envelopes, bytes, inboxes held and store nodes known.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
from prometheus_client import Gauge

from teia.dht.core import Mode
from teia.dht.node import DhtNode
from teia.dht.storage import DhtStore
from teia.errors import ConfigError, DhtError, InvalidMultiaddr
from teia.host.host import Host
from teia.identity import Identity, Multiaddr
from teia.service import ServiceConfig, ServiceContext, add_arguments, setting
from teia.service.checks import (
    announce_address,
    dht_node_address,
    non_negative,
    positive,
    quic_listen_address,
)
from teia.service.identity import node_identity
from teia.service.logs import fields
from teia.service.runner import main
from teia.store.membership import (
    DhtMembership,
    StaticMembership,
    StoreMembership,
    StoreNodeInfo,
)
from teia.store.node import DAY_S, StoreNode, StoreSettings
from teia.store.storage import InboxStore, StoreLimits

__all__ = ["StoreConfig", "register", "serve"]

_IDENTITY_FILE = "store-identity.key"
_DATABASE_FILE = "store.db"
_DHT_FILE = "dht.db"
_BOOTSTRAP_RETRY_S = 30.0


def _peer(value: Any) -> str | None:
    try:
        StoreNodeInfo.from_multiaddr(value)
    except (InvalidMultiaddr, ValueError) as exc:
        return str(exc)
    return None


def _ttl_days(value: Any) -> str | None:
    return None if 7 <= value <= 14 else "must be between 7 and 14 days (the operator window)"


@dataclass
class StoreConfig(ServiceConfig):
    listen: list[str] = setting(
        ["/ip4/0.0.0.0/udp/4003/quic-v1"], "QUIC listen address", metavar="MULTIADDR",
        check=quic_listen_address,
    )  # fmt: skip
    bootstrap: list[str] = setting(
        [], "a DHT node to join through (…/quic-v1/p2p/<id>); store nodes are then found in "
        "the DHT", metavar="MULTIADDR", check=dht_node_address,
    )  # fmt: skip
    peer: list[str] = setting(
        [], "another store node (…/quic-v1/p2p/<id>), for a static membership without the DHT",
        metavar="MULTIADDR", check=_peer,
    )  # fmt: skip
    announce: list[str] = setting(
        [], "address to publish in the DHT instead of the listen addresses (e.g. the public "
        "one)", metavar="MULTIADDR", check=announce_address,
    )  # fmt: skip
    membership_interval: float = setting(
        60.0, "seconds between checks of the store nodes found in the DHT", check=positive
    )
    data_dir: Path = setting(Path("/var/lib/teia/store"), "state directory", metavar="DIR")
    default_ttl_days: int = setting(14, "TTL of envelopes that ask for none", check=_ttl_days)
    min_ttl_days: int = setting(
        7, "shortest TTL kept (shorter requests are raised)", check=_ttl_days
    )
    max_ttl_days: int = setting(14, "longest TTL kept (longer requests are cut)", check=_ttl_days)
    max_inbox_envelopes: int = setting(10_000, "envelopes per inbox", check=positive)
    max_inbox_bytes: int = setting(64 * 1024 * 1024, "payload bytes per inbox", check=positive)
    max_disk_bytes: int = setting(
        8 * 1024 * 1024 * 1024, "payload bytes on this node (disk quota)", check=positive
    )
    deposit_rate: float = setting(200.0, "envelopes/s one peer may deposit", check=positive)
    deposit_burst: float = setting(2000.0, "deposit burst per peer", check=positive)
    request_rate: float = setting(100.0, "other requests/s per peer", check=positive)
    request_burst: float = setting(500.0, "request burst per peer", check=positive)
    replication: int = setting(3, "store nodes holding each inbox (R)", check=positive)
    batch_max: int = setting(1024, "envelopes committed per transaction at most", check=positive)
    purge_interval: float = setting(60.0, "seconds between purges of expired envelopes",
                                    check=positive)  # fmt: skip
    anti_entropy_interval: float = setting(
        300.0, "seconds between anti-entropy rounds (0: only on membership changes)",
        check=non_negative,
    )  # fmt: skip

    identity_file: ClassVar[str | None] = _IDENTITY_FILE

    def validate(self) -> None:
        settings_from(self)


def load_identity(data_dir: Path) -> Identity:
    """The node's identity from ``data_dir``, created (0600, atomically) on first start."""
    return node_identity(data_dir, _IDENTITY_FILE)


def settings_from(config: StoreConfig) -> tuple[StoreSettings, StoreLimits]:
    """The node policy and the database limits that ``config`` describes."""
    if not config.min_ttl_days <= config.default_ttl_days <= config.max_ttl_days:
        raise ConfigError("min-ttl-days <= default-ttl-days <= max-ttl-days must hold")
    if config.bootstrap and config.peer:
        raise ConfigError(
            "give either bootstrap (store nodes found in the DHT) or peer (a static list of "
            "store nodes), not both"
        )
    settings = StoreSettings(
        default_ttl_s=config.default_ttl_days * DAY_S,
        min_ttl_s=config.min_ttl_days * DAY_S,
        max_ttl_s=config.max_ttl_days * DAY_S,
        batch_max=config.batch_max,
        deposit_rate=config.deposit_rate,
        deposit_burst=config.deposit_burst,
        request_rate=config.request_rate,
        request_burst=config.request_burst,
        replication=config.replication,
        purge_interval=config.purge_interval,
        anti_entropy_interval=config.anti_entropy_interval or 1e9,
    )
    limits = StoreLimits(
        max_inbox_envelopes=config.max_inbox_envelopes,
        max_inbox_bytes=config.max_inbox_bytes,
        max_total_bytes=config.max_disk_bytes,
    )
    return settings, limits


async def serve(ctx: ServiceContext) -> None:
    """The service body: serve until cancelled."""
    config = ctx.config
    assert isinstance(config, StoreConfig)
    settings, limits = settings_from(config)
    identity = load_identity(config.data_dir)
    peers = [StoreNodeInfo.from_multiaddr(addr) for addr in config.peer]
    async with contextlib.AsyncExitStack() as stack:
        store = stack.enter_context(InboxStore(config.data_dir / _DATABASE_FILE, limits=limits))
        host = await stack.enter_async_context(Host(identity, listen=config.listen))
        dht: DhtNode | None = None
        membership: StoreMembership
        if config.bootstrap:
            dht_store = stack.enter_context(DhtStore(config.data_dir / _DHT_FILE))
            dht = await stack.enter_async_context(DhtNode(host, mode=Mode.SERVER, store=dht_store))
            # A peer without a record may be a node that has yet to publish: asked again at
            # the next check rather than after the five minutes a "no" from a record lasts.
            membership = DhtMembership(
                dht,
                refresh_interval=config.membership_interval,
                missing_ttl_s=max(1, math.ceil(config.membership_interval)),
            )
        else:
            me = StoreNodeInfo(identity.peer_id, tuple(host.listen_addrs))
            membership = StaticMembership([me, *peers])
        Gauge(
            "teia_store_nodes", "store nodes in the membership (this one included)",
            registry=ctx.registry,
        ).set_function(lambda: len(membership.store_nodes()))  # fmt: skip
        node = await stack.enter_async_context(
            StoreNode(host, store, membership=membership, settings=settings, registry=ctx.registry)
        )
        ctx.ready(
            peer_id=str(identity.peer_id),
            listen=",".join(str(a) for a in host.addrs) or ",".join(config.listen),
            membership="dht" if dht is not None else "static",
            store_nodes=len(membership.store_nodes()),
            envelopes=store.envelope_count,
            inboxes=store.inbox_count,
        )
        if dht is not None:
            assert isinstance(membership, DhtMembership)
            announce = [Multiaddr(a) for a in config.announce] or None
            await _join_and_follow(ctx, dht, membership, list(config.bootstrap), announce)
        else:
            if peers:
                # A node that (re)starts catches up with its replicas at once.
                await node.run_anti_entropy()
            await anyio.sleep_forever()


async def _join_and_follow(
    ctx: ServiceContext,
    dht: DhtNode,
    membership: DhtMembership,
    bootstrap: list[str],
    announce: list[Multiaddr] | None,
) -> None:
    """Join the DHT (retrying while no bootstrap node answers: they may start later), publish
    this node's record, then re-check the store nodes every refresh interval, logging changes
    (the store node's anti-entropy loop follows the membership's version)."""
    while True:
        try:
            reached = await dht.bootstrap(bootstrap)
        except DhtError as exc:
            ctx.log.warning("DHT bootstrap failed; retrying", extra=fields(reason=str(exc)))
            await anyio.sleep(_BOOTSTRAP_RETRY_S)
            continue
        ctx.log.info("joined the DHT", extra=fields(bootstrap_reached=reached))
        break
    stored = await dht.publish_record(announce)
    ctx.log.info("record published", extra=fields(stored_on=stored))
    seen = -1
    while True:
        nodes = await membership.refresh()
        if membership.version != seen:
            seen = membership.version
            ctx.log.info(
                "store nodes",
                extra=fields(count=len(nodes), peers=sorted(str(n.peer_id) for n in nodes)),
            )
        await anyio.sleep(membership.refresh_interval)


def _run(args: argparse.Namespace) -> int:
    return main("store", StoreConfig, args, serve)


def register(sub: Any) -> None:
    """Register ``teia store`` on the top-level subparsers."""
    parser = sub.add_parser(
        "store",
        help="run a store-and-forward node (inboxes for offline peers)",
        description="Hold end-to-end encrypted envelopes for offline peers in inboxes keyed by "
        "the recipient's key hash, for 7 to 14 days or until the recipient acknowledges them "
        "(signed); hold prekey bundles; replicate each inbox on the R store nodes closest to "
        "it and reconcile them by anti-entropy. Store nodes are found in the DHT (--bootstrap "
        "names DHT nodes to join through) or listed (--peer names the other store nodes).",
    )
    add_arguments(parser, StoreConfig)
    parser.set_defaults(handler=_run)
