"""What every concern of the controller works with, opened once per process.

The concerns (tokens, enrollment, nodes, policies, agents, …) are plain
functions that take a :class:`Context` first, as Headscale's queries take a
transaction: what they share is named in one small typed object rather than
being ``self`` of a class that grew a method per API call, so each concern
can be read, and called from a test, on its own. Nothing here decides
anything: opening the data directory and seeding the netmap hub from the
store is all there is, and this module imports no concern.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from idmesh.metrics import Metrics
from meshcore.addressing import MeshPrefixes
from meshcore.errors import Conflict, Unavailable
from meshcore.identity import CertificateAuthority, Identity, Kind, SpiffeId

from .authority import DataDir, JwtKey, load_authority
from .netmap import NetmapHub
from .oidc import OidcProvider
from .ratelimit import FailureLimiter
from .store import Store, Tx

__all__ = ["Context", "NatSettings", "Settings"]


@dataclass(frozen=True)
class Settings:
    """What ``mesh-controller init`` fixed for the life of the mesh (the store's meta table)."""

    domain: str
    url: str
    prefixes: MeshPrefixes
    node_cert_ttl: timedelta

    def spiffe_id(self, kind: Kind, name: str) -> SpiffeId:
        return SpiffeId(self.domain, kind, name)

    @classmethod
    def read(cls, tx: Tx) -> Settings:
        meta = {k: tx.meta(k) or "" for k in ("domain", "url", "prefix_v4", "prefix_v6", "block_v4",
                                              "block_v6", "node_cert_ttl")}
        if not meta["domain"]:
            raise Unavailable("the controller database holds no mesh: run 'mesh-controller init' first")
        prefixes = MeshPrefixes(
            ipaddress.IPv4Network(meta["prefix_v4"]), ipaddress.IPv6Network(meta["prefix_v6"]),
            int(meta["block_v4"]), int(meta["block_v6"]),
        )
        return cls(meta["domain"], meta["url"], prefixes, timedelta(seconds=int(meta["node_cert_ttl"])))


@dataclass(frozen=True)
class NatSettings:
    """How ``mesh-controller serve`` helps nodes behind NAT: its STUN addresses and the TURN relay, if any."""

    stun: tuple[str, ...] = ()
    """ip:port of the STUN server, as nodes reach it (two ports: see controller.stun)."""
    relay: str | None = None
    """host:port of the TURN server (UDP); None: no relay."""
    relay_secret: bytes | None = field(default=None, repr=False)
    """Its ``static-auth-secret``: read from ``--relay-secret-file``, never stored or logged."""
    credential_ttl: timedelta = timedelta(hours=12)


@dataclass(eq=False)
class Context:
    """The controller's state: durable (store, CA, settings) and in memory (the rest).

    ``provider`` is the identity provider as (its configuration, the
    client), kept by :func:`controller.logins.identity_provider`;
    ``approvals`` wakes a device waiting on a login the moment it is approved.
    """

    store: Store
    ca: CertificateAuthority
    settings: Settings
    hub: NetmapHub
    limiter: FailureLimiter = field(default_factory=FailureLimiter)
    metrics: Metrics = field(default_factory=Metrics)
    provider: tuple[str, OidcProvider] | None = None
    nat: NatSettings = field(default_factory=NatSettings)
    approvals: dict[str, asyncio.Event] = field(default_factory=dict)
    verified_leaves: dict[bytes, Identity] = field(default_factory=dict)
    data: Path = Path()
    """The data directory it was opened from."""
    svid_ttl: timedelta = timedelta(hours=1)
    """The longest life of an X509-SVID handed out through a Workload API (``serve --svid-ttl``)."""
    jwt_key: JwtKey | None = None
    """The JWT-SVID key, loaded (or made) the first time it is needed (controller.workload)."""
    loop: asyncio.AbstractEventLoop | None = None
    """The event loop serving the API (set by ``serve``): what worker threads hand loop work to."""
    flow_retention: timedelta = timedelta(days=7)
    """How long flow records are kept (``serve --flow-retention``)."""
    flow_batches: int = 0
    """Flow batches recorded since start (:func:`controller.flows.record_flows` prunes every hundredth)."""
    """Client certificates already verified, by DER (:data:`controller.auth.VERIFIED_LEAVES`)."""

    def on_loop(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the API's event loop (at once when there is none: a test, a command)."""
        if self.loop is None or self.loop.is_closed():
            callback()
        else:
            self.loop.call_soon_threadsafe(callback)

    @classmethod
    def open(cls, data: Path) -> Context:
        """The controller of the mesh in ``data`` (made by ``mesh-controller init``)."""
        ca = load_authority(data)
        where, own_url = DataDir(data).replica()
        store = Store.open(where)
        try:
            with store.transaction() as tx:
                settings = Settings.read(tx)
                _same_mesh(tx, ca, settings, store)
                if own_url is not None:
                    settings = replace(settings, url=own_url)
                hub = NetmapHub.load(tx, settings.domain, settings.prefixes)
        except BaseException:
            store.close()
            raise
        return cls(store, ca, settings, hub, data=data)


def _same_mesh(tx: Tx, ca: CertificateAuthority, settings: Settings, store: Store) -> None:
    """A replica whose CA or domain is not the database's is refused: it would sign for another mesh."""
    stored = tx.meta("ca_fingerprint")
    if stored is None:  # a store from before replicas: it learns its CA now
        tx.set_meta("ca_fingerprint", ca.fingerprint)
    elif stored != ca.fingerprint:
        raise Conflict(f"the database {store.description} belongs to the mesh CA sha256:{stored}, not this data "
                       f"directory's (sha256:{ca.fingerprint}): refusing to serve another mesh")
    if ca.trust_domain != settings.domain:
        raise Conflict(f"the database {store.description} is the mesh {settings.domain}, but this data directory's "
                       f"CA is for {ca.trust_domain}: refusing to serve another mesh")
