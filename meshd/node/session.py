"""meshd's link to the controller: the netmap stream, endpoint reports and
certificate renewal, with reconnection.

The protocol logic (what a message does to the view) is in
:class:`meshcore.netmap.NodeView`; this module only moves bytes and waits.
A lost connection changes nothing on the data plane: the interface keeps
its peers until the controller says otherwise.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from idmesh.client import answer_error, client_ssl_context
from idmesh.local import error_of_answer
from meshcore.errors import IdmeshError, Unavailable
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

__all__ = ["Backoff", "ControllerSession"]

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


@dataclass
class Backoff:
    """Jittered exponential back-off: base·2ⁿ capped, times a factor in [0.5, 1.5)."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt += 1
        return float(delay * (0.5 + random.random()))

    def reset(self) -> None:
        self.attempt = 0


class ControllerSession:
    def __init__(self, state: StateDir, url: str, version: Callable[[], int | None],
                 on_full: Callable[[Netmap], None], on_delta: Callable[[NetmapDelta], None],
                 on_policy: Callable[[PolicyDoc], None], on_agents: Callable[[AgentUpdate], None],
                 endpoints: Callable[[], Awaitable[EndpointReport]],
                 on_nat: Callable[[NatConfig], None] = lambda _: None,
                 on_probe: Callable[[ProbeRequest], None] = lambda _: None) -> None:
        self.state = state
        self.url = url.rstrip("/")
        self._version = version
        self._on_full = on_full
        self._on_delta = on_delta
        self._on_policy = on_policy
        self._on_agents = on_agents
        self._endpoints = endpoints
        self._on_nat = on_nat
        self._on_probe = on_probe
        self.connected = False
        self.protocol: int | None = None  # what the controller agreed to speak on the stream
        self.last_error: str | None = None
        self.clock_offset: float | None = None  # the controller's clock minus ours, seconds (its Date header)
        self._ca = state.ca_cert.read_text()
        self._ssl = self._context()
        self._calls: ControllerCalls | None = None
        self._streaming: asyncio.Future[None] | None = None
        self._reconnecting: str | None = None

    def _context(self) -> ssl.SSLContext:
        return client_ssl_context(self._ca, cert_file=self.state.node_cert, key_file=self.state.node_key)

    def _client(self) -> httpx.AsyncClient:
        timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
        return httpx.AsyncClient(base_url=self.url, verify=self._ssl, timeout=timeout, trust_env=False,
                                 headers={PROTOCOL_HEADER: str(PROTOCOL)})

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
        """Stay connected forever; every failure is logged once and retried."""
        backoff = Backoff()
        while True:
            delay: float | None = None
            self._streaming = asyncio.ensure_future(self._stream(backoff))
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
            delay = backoff.next() if delay is None else delay
            log.warning("controller %s: %s; reconnecting in %.1f s", self.url, self.last_error, delay)
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

    async def _stream(self, backoff: Backoff) -> None:
        async with self._client() as http:
            # fields at their defaults (no MCP ports, say) are left out: an older controller still takes it
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
                backoff.reset()
                log.info("connected to controller %s (protocol %d, it supports %s)", self.url, self.protocol,
                         resp.headers.get(SUPPORTED_HEADER, "2"))
                skipped: set[str] = set()
                async for line in resp.aiter_lines():
                    if line.strip():
                        self._dispatch(StreamMessage.model_validate_json(line), skipped)

    def _dispatch(self, message: StreamMessage, skipped: set[str]) -> None:
        """One stream message to its handler; a type this node does not know (a newer controller's) is skipped."""
        if message.type == "full" and message.full is not None:
            self._on_full(message.full)
        elif message.type == "delta" and message.delta is not None:
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
        connection: an agent's birth must not pay for a TLS handshake (:mod:`meshd.node.calls`)."""
        if self._calls is None:
            self._calls = ControllerCalls(self.url, self._ssl, {PROTOCOL_HEADER: str(PROTOCOL)})
        status, data = await self._calls.request(method, path, body)
        if status >= 400:
            raise error_of_answer(status, data, "controller")
        return json.loads(data)

    async def report_endpoints(self) -> None:
        """Tell the controller where we are now (e.g. after an address change); Unavailable when it cannot be reached.

        (The stream reports again when it reconnects, so a report lost here is only late.)
        """
        try:
            async with self._client() as http:
                await self._post(http, "/v1/endpoints", (await self._endpoints()).model_dump(exclude_defaults=True))
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
        async with self._client() as http:
            answer = RenewResponse.model_validate(
                await self._post(http, "/v1/renew", RenewRequest(csr=build_csr(key)).model_dump())
            )
        write_private(self.state.node_cert, answer.certificate, 0o644)
        self._ssl = self._context()
        if self._calls is not None:  # the kept connections still present the old certificate
            self._calls.close()
            self._calls = None
        cert = x509.load_pem_x509_certificate(answer.certificate.encode())
        log.info("node certificate renewed, valid until %s", cert.not_valid_after_utc.isoformat())

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


