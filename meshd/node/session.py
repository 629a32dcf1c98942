"""meshd's link to the controller: the netmap stream, endpoint reports and
certificate renewal, with reconnection and failover between replicas.

The protocol logic (what a message does to the view) is in
:class:`meshcore.netmap.NodeView`; this module only moves bytes and waits.
A lost connection changes nothing on the data plane: the interface keeps
its peers until the controller says otherwise.

With several controller replicas (SPEC §8) a stream that ends or cannot
open moves to the next replica after the delay :class:`meshcore.failover.Failover`
says; every full map, and a delta when it changed, tells the list anew.
A request that could not even connect goes to the next replica; one that
was sent is not sent again elsewhere.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from idmesh.client import answer_error, client_ssl_context
from idmesh.local import error_of_answer
from meshcore.errors import IdmeshError, Unavailable, Unreachable
from meshcore.failover import Failover, tried_in_order, usable_urls
from meshcore.identity import CLOCK_SKEW, build_csr
from meshcore.netmap import ResyncNeeded
from meshcore.wire import PROTOCOL, PROTOCOL_HEADER, SUPPORTED_HEADER
from meshcore.wire.api import RenewRequest, RenewResponse
from meshcore.wire.stream import (
    MESSAGE_TYPES,
    AgentUpdate,
    EndpointReport,
    NatConfig,
    Netmap,
    NetmapDelta,
    PolicyDoc,
    ProbeRequest,
    StreamMessage,
)
from meshd.node.calls import ControllerCalls
from meshd.node.state import StateDir, write_private

__all__ = ["ControllerSession"]

log = logging.getLogger("meshd.node.session")

READ_TIMEOUT = 35.0  # the controller sends a keepalive every 10 s


def clock_offset(date: str | None, now: datetime) -> float | None:
    """Seconds the clock that wrote HTTP ``Date`` header ``date`` is ahead of ``now`` (1 s resolution)."""
    if not date:
        return None
    try:
        theirs = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    return (theirs - now).total_seconds() if theirs.tzinfo is not None else None


class ControllerSession:
    """The link to the controller at ``url``: one URL, or every replica's in the order to try.

    ``on_controllers`` hears the replicas' URLs whenever the controller's
    list changes, to keep them across restarts.
    """

    def __init__(self, state: StateDir, url: str | Sequence[str], version: Callable[[], int | None],
                 on_full: Callable[[Netmap], None], on_delta: Callable[[NetmapDelta], None],
                 on_policy: Callable[[PolicyDoc], None], on_agents: Callable[[AgentUpdate], None],
                 endpoints: Callable[[], Awaitable[EndpointReport]],
                 on_nat: Callable[[NatConfig], None] = lambda _: None,
                 on_probe: Callable[[ProbeRequest], None] = lambda _: None,
                 on_controllers: Callable[[tuple[str, ...]], None] = lambda _: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self._failover = Failover([url] if isinstance(url, str) else url)
        self._on_controllers = on_controllers
        self._clock = clock
        self._version = version
        self._on_full = on_full
        self._on_delta = on_delta
        self._on_policy = on_policy
        self._on_agents = on_agents
        self._endpoints = endpoints
        self._on_nat = on_nat
        self._on_probe = on_probe
        self.connected = False
        self._reporting = asyncio.Lock()
        """Endpoint reports go one at a time, each built as it is sent: the controller answers each before the
        next leaves, so the last it stores is the newest (two sent at once, a relayed address and a STUN round,
        could commit in the other order there and leave a stale one in the map)."""
        self.protocol: int | None = None  # what the controller agreed to speak on the stream
        self.last_error: str | None = None
        self.clock_offset: float | None = None  # the controller's clock minus ours, seconds (its Date header)
        self._ca = state.ca_cert.read_text()
        self._ssl = self._context()
        self._calls: dict[str, ControllerCalls] = {}  # kept connections, by controller URL
        self._streaming: asyncio.Future[None] | None = None
        self._reconnecting: str | None = None

    @property
    def url(self) -> str:
        """The controller streamed from, or the one to be tried next while there is no stream."""
        return self._failover.url

    @property
    def urls(self) -> tuple[str, ...]:
        """Every controller replica's URL, in the order to try."""
        return self._failover.urls

    def _context(self) -> ssl.SSLContext:
        return client_ssl_context(self._ca, cert_file=self.state.node_cert, key_file=self.state.node_key)

    def _client(self, url: str | None = None) -> httpx.AsyncClient:
        timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
        return httpx.AsyncClient(base_url=url or self.url, verify=self._ssl, timeout=timeout, trust_env=False,
                                 headers={PROTOCOL_HEADER: str(PROTOCOL)})

    def _learn(self, urls: Sequence[str]) -> None:
        """The controller's list of replicas; an empty one (or one of nothing usable) leaves ours as it is."""
        if not self._failover.learn(usable_urls(urls)):
            return
        log.info("controller replicas: %s", " ".join(self.urls))
        for gone in [url for url in self._calls if url not in self.urls and url != self.url]:
            self._calls.pop(gone).close()
        self._on_controllers(self.urls)

    def reconnect(self, why: str) -> None:
        """Drop the stream and connect again now: the underlay changed (a NAT forgot this node, say).

        The stream's TCP connection then usually died silently: the
        controller's writes are dropped by a NAT with no mapping for them,
        and this end, which only reads, would notice after READ_TIMEOUT.
        """
        if self._streaming is not None and not self._streaming.done() and self.connected:
            self._reconnecting = why
            self._streaming.cancel()

    async def run(self) -> None:
        """Stay connected forever; every failure is logged once and retried, at the next replica if any."""
        while True:
            delay: float | None = None
            self._streaming = asyncio.ensure_future(self._stream())
            try:
                await self._streaming
                self.last_error = "the controller closed the stream"
            except (httpx.HTTPError, IdmeshError, ValueError, ResyncNeeded) as exc:
                self.last_error = _describe(exc)
            except asyncio.CancelledError:
                if self._reconnecting is None or not self._streaming.cancelled():
                    raise  # meshd is stopping
                self.last_error, self._reconnecting, delay = self._reconnecting, None, 0.0
            self.connected = False
            failed = self.url
            if delay is None:  # (a reconnect() stays with the same controller, at once)
                delay = self._failover.failed(self._clock())
            if self.url == failed:
                log.warning("controller %s: %s; reconnecting in %.1f s", failed, self.last_error, delay)
            else:
                log.warning("controller %s: %s; trying %s in %.1f s", failed, self.last_error, self.url, delay)
            await asyncio.sleep(delay)

    def _check_clock(self, date: str | None) -> None:
        """Say so when the controller's clock and ours differ by more than certificates allow.

        Leaves are valid from :data:`CLOCK_SKEW` before their issue: a
        controller further ahead issues certificates this node (and every
        other) refuses as not valid yet, one further behind makes short-lived
        ones expire early here. Neither can be fixed here; it must be said.
        """
        self.clock_offset = offset = clock_offset(date, datetime.now(UTC))
        skew = self.clock_skew()
        if skew is not None and offset is not None:
            log.warning("%s, more than the %.0f s certificates allow: %s; set both clocks with NTP", skew,
                        CLOCK_SKEW.total_seconds(),
                        "what it issues is not valid here yet" if offset > 0 else "what it issues expires early here")

    def clock_skew(self) -> str | None:
        """``the controller's clock is 600 s ahead of this node's`` when it is off by more than certificates allow."""
        offset = self.clock_offset
        if offset is None or abs(offset) <= CLOCK_SKEW.total_seconds() + 1:  # + the Date header's 1 s resolution
            return None
        return f"the controller's clock is {abs(offset):.0f} s {'ahead of' if offset > 0 else 'behind'} this node's"

    async def _stream(self) -> None:
        async with self._client() as http:
            # fields at their defaults (no MCP ports, say) are left out: an older controller still takes it
            async with self._reporting:
                await self._post(http, "/v1/endpoints", (await self._endpoints()).model_dump(exclude_defaults=True))
            since = self._version()
            params = {"since": str(since)} if since is not None else {}
            async with http.stream("GET", "/v1/netmap", params=params) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise answer_error(resp, "controller")
                self.protocol = _agreed(resp.headers.get(PROTOCOL_HEADER))
                self._check_clock(resp.headers.get("date"))
                self.connected = True
                self.last_error = None
                self._failover.connected(self._clock())
                log.info("connected to controller %s (protocol %d, it supports %s)", self.url, self.protocol,
                         resp.headers.get(SUPPORTED_HEADER, "2"))
                skipped: set[str] = set()
                async for line in resp.aiter_lines():
                    if line.strip():
                        self._dispatch(StreamMessage.model_validate_json(line), skipped)

    def _dispatch(self, message: StreamMessage, skipped: set[str]) -> None:
        """One stream message to its handler; a type this node does not know (a newer controller's) is skipped."""
        if message.type == "full" and message.full is not None:
            self._learn(message.full.controllers)
            self._on_full(message.full)
        elif message.type == "delta" and message.delta is not None:
            if message.delta.controllers is not None:
                self._learn(message.delta.controllers)
            self._on_delta(message.delta)
        elif message.type == "policy" and message.policy is not None:
            self._on_policy(message.policy)
        elif message.type == "agents" and message.agents is not None:
            self._on_agents(message.agents)
        elif message.type == "nat" and message.nat is not None:
            self._on_nat(message.nat)
        elif message.type == "probe" and message.probe is not None:
            self._on_probe(message.probe)
        elif message.type not in MESSAGE_TYPES and message.type not in skipped:
            skipped.add(message.type)
            log.info("controller %s sends %r messages, which this meshd does not know: skipped", self.url,
                     message.type)

    async def call(self, method: str, path: str, body: object = None) -> object:
        """One request to the controller with the node certificate, on a kept-alive
        connection: an agent's birth must not pay for a TLS handshake (:mod:`meshd.node.calls`).

        It goes to the replica streamed from; only when no connection can be made
        to that one does it go to the next (nothing was sent, so nothing is done twice).
        """
        refused: Unreachable | None = None
        for url in tried_in_order(self.urls, self.url):
            if url not in self._calls:
                self._calls[url] = ControllerCalls(url, self._ssl, {PROTOCOL_HEADER: str(PROTOCOL)})
            try:
                status, data = await self._calls[url].request(method, path, body)
            except Unreachable as exc:
                refused = refused or exc  # the error of the one streamed from says the most
                continue
            if status >= 400:
                raise error_of_answer(status, data, "controller")
            return json.loads(data)
        assert refused is not None
        raise refused

    async def _post_anywhere(self, path: str, body: object) -> object:
        """POST to the replica streamed from, or to the next ones while none can be connected to."""
        refused: httpx.HTTPError | None = None
        for url in tried_in_order(self.urls, self.url):
            async with self._client(url) as http:
                try:
                    return await self._post(http, path, body)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # not connected: nothing was sent
                    refused = refused or exc
        assert refused is not None
        raise refused

    async def report_endpoints(self) -> None:
        """Tell the controller where we are now (e.g. after an address change); Unavailable when it cannot be reached.

        (The stream reports again when it reconnects, so a report lost here is only late.)
        """
        try:
            async with self._reporting:
                await self._post_anywhere("/v1/endpoints",
                                          (await self._endpoints()).model_dump(exclude_defaults=True))
        except httpx.HTTPError as exc:
            raise Unavailable(f"controller {self.url}: {_describe(exc)}") from exc

    async def renew_when_due(self, check_every: float = 60.0) -> None:
        """Renew the node certificate once two thirds of its life have passed."""
        while True:
            try:
                cert = x509.load_pem_x509_certificate(self.state.node_cert.read_bytes())
                start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
                due = start + (end - start) * 2 / 3
                if datetime.now(UTC) >= due:
                    await self.renew()
            except (httpx.HTTPError, IdmeshError, OSError, ValueError) as exc:
                log.warning("certificate renewal failed: %s; will retry", _describe(exc))
            await asyncio.sleep(check_every)

    async def renew(self) -> None:
        key = serialization.load_pem_private_key(self.state.node_key.read_bytes(), password=None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        answer = RenewResponse.model_validate(
            await self._post_anywhere("/v1/renew", RenewRequest(csr=build_csr(key)).model_dump()))
        write_private(self.state.node_cert, answer.certificate, 0o644)
        self._ssl = self._context()
        self.close()  # the kept connections still present the old certificate
        cert = x509.load_pem_x509_certificate(answer.certificate.encode())
        log.info("node certificate renewed, valid until %s", cert.not_valid_after_utc.isoformat())

    def close(self) -> None:
        """Close the connections kept for calls (the certificate changed, or meshd stops)."""
        for calls in self._calls.values():
            calls.close()
        self._calls.clear()

    @staticmethod
    async def _post(http: httpx.AsyncClient, path: str, body: object) -> object:
        resp = await http.post(path, json=body)
        if resp.status_code >= 400:
            raise answer_error(resp, "controller")
        return resp.json()


def _agreed(header: str | None) -> int:
    """The protocol the controller answered; an older controller says nothing, and speaks 2."""
    try:
        return int(header) if header else 2
    except ValueError:
        return 2


def _describe(exc: BaseException) -> str:
    if isinstance(exc, IdmeshError):
        return str(exc)
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc.__cause__ or exc})"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


