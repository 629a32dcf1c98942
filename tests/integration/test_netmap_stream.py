"""The netmap stream and endpoint reports over mTLS, against a real controller on loopback.

Nodes are enrolled with the real ``meshd enroll``; the test then speaks for
each node with its own certificate and key, as meshd does, and reads
``GET /v1/netmap`` line by line. Every read has a short time-out, so a
missing message fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from idmesh.client import AdminCredential, client_ssl_context
from meshcore.wire import PROTOCOL, PROTOCOL_HEADER, SUPPORTED_HEADER
from meshcore.wire.stream import NetmapDelta, PeerNode, StreamMessage

from .conftest import BIN, Controller, cli

READ_TIMEOUT = 5.0  # the controller answers at once; its keepalives come every 10 s


class Node:
    """One enrolled node, speaking to the controller with its own certificate."""

    def __init__(self, controller: Controller, state: Path) -> None:
        self.state = state
        self.record = json.loads((state / "node.json").read_text())
        self.name: str = self.record["name"]
        ctx = client_ssl_context((state / "ca.crt").read_text(), cert_file=state / "node.crt",
                                 key_file=state / "node.key")
        self.http = httpx.Client(base_url=controller.url, verify=ctx, trust_env=False,
                                 timeout=httpx.Timeout(READ_TIMEOUT))

    def post_endpoints(self, body: Any) -> httpx.Response:
        return self.http.post("/v1/endpoints", json=body)

    def close(self) -> None:
        self.http.close()


class Stream:
    """An open ``GET /v1/netmap``; :meth:`next` skips keepalives and policy documents."""

    def __init__(self, node: Node, since: int | None = None) -> None:
        params = {"since": str(since)} if since is not None else {}
        self.response = node.http.send(node.http.build_request("GET", "/v1/netmap", params=params), stream=True)
        assert self.response.status_code == 200, self.response.read()
        assert self.response.headers["content-type"].startswith("application/x-ndjson")
        self._lines = self.response.iter_lines()

    def next(self) -> StreamMessage | None:
        """The next full map or delta; None when the controller ended the stream."""
        for line in self._lines:
            if line.strip():
                message = StreamMessage.model_validate_json(line)
                if message.type in ("full", "delta"):
                    return message
        return None

    def delta(self) -> NetmapDelta:
        message = self.next()
        assert message is not None and message.type == "delta" and message.delta is not None, message
        return message.delta

    def close(self) -> None:
        self.response.close()


class Mesh:
    def __init__(self, controller: Controller, tmp: Path) -> None:
        self.controller = controller
        self.tmp = tmp
        self.token = controller.token("--tag", "db", "--reusable")
        self._open: list[Node | Stream] = []

    def enroll(self, name: str) -> Node:
        state = self.tmp / name
        cli("meshd", "enroll", self.token, "--name", name, "--state", str(state), check=True)
        node = Node(self.controller, state)
        self._open.append(node)
        return node

    def stream(self, node: Node, since: int | None = None) -> Stream:
        stream = Stream(node, since)
        self._open.append(stream)
        return stream

    def remove(self, name: str) -> None:
        cli("meshctl", "nodes", "remove", name, env=self.controller.env, check=True)

    def close(self) -> None:
        for thing in reversed(self._open):
            thing.close()


@pytest.fixture
def mesh(controller: Controller, tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(controller, tmp_path / "nodes")
    try:
        yield m
    finally:
        m.close()


def full_version(stream: Stream) -> int:
    message = stream.next()
    assert message is not None and message.type == "full" and message.full is not None, message
    return message.full.version


def test_a_stream_starts_with_the_full_map_of_every_node(mesh: Mesh) -> None:
    nodes = [mesh.enroll(f"db-{i}") for i in range(3)]
    message = mesh.stream(nodes[0]).next()
    assert message is not None and message.type == "full" and message.full is not None
    full = message.full
    assert full.domain == "acme.mesh" and len(full.prefixes) == 2
    assert set(full.nodes) == {"db-0", "db-1", "db-2"}  # the receiving node included
    for node in nodes:
        peer = full.nodes[node.name]
        assert peer.wireguard_public_key == node.record["wireguard_public_key"]
        assert list(peer.addresses) == node.record["addresses"]
        assert list(peer.blocks) == node.record["blocks"]
        assert peer.tags == ("db",) and peer.owner is None and peer.endpoints == ()
    assert full.version >= 3  # one version per enrollment at least


def test_an_enrollment_reaches_every_open_stream_as_one_delta(mesh: Mesh) -> None:
    a, b = mesh.enroll("a"), mesh.enroll("b")
    streams = [mesh.stream(a), mesh.stream(b)]
    versions = {full_version(s) for s in streams}
    assert len(versions) == 1
    (v,) = versions
    c = mesh.enroll("c")
    for stream in streams:
        delta = stream.delta()
        assert (delta.base, delta.version, delta.remove) == (v, v + 1, ())
        assert [p.name for p in delta.upsert] == ["c"]
        assert delta.upsert[0].wireguard_public_key == c.record["wireguard_public_key"]
    # exactly one: the next line on every stream is already the next change
    assert a.post_endpoints({"listen_port": 51820, "endpoints": ["198.51.100.11:51820"]}).status_code == 200
    for stream in streams:
        assert stream.delta().base == v + 1


def test_a_removed_node_leaves_every_map_and_loses_its_stream_and_certificate(mesh: Mesh) -> None:
    a, b = mesh.enroll("a"), mesh.enroll("b")
    stream_a, stream_b = mesh.stream(a), mesh.stream(b)
    v = full_version(stream_a)
    assert full_version(stream_b) == v
    mesh.remove("b")
    delta = stream_a.delta()
    assert (delta.base, delta.version, delta.upsert, delta.remove) == (v, v + 1, (), ("b",))
    assert stream_b.next() is None  # the controller ends the removed node's stream
    refused = b.http.get("/v1/netmap")
    assert refused.status_code == 403
    assert "revoked" in refused.json()["error"]
    assert b.post_endpoints({"listen_port": 51820, "endpoints": []}).status_code == 403


def test_reconnecting_with_since_gives_only_the_missed_deltas(mesh: Mesh) -> None:
    a = mesh.enroll("a")
    first = mesh.stream(a)
    v = full_version(first)
    first.close()
    mesh.enroll("b")  # v+1
    mesh.enroll("c")  # v+2
    mesh.remove("b")  # v+3
    again = mesh.stream(a, since=v)
    missed = [again.delta() for _ in range(3)]
    assert [(d.base, d.version) for d in missed] == [(v, v + 1), (v + 1, v + 2), (v + 2, v + 3)]
    assert [[p.name for p in d.upsert] for d in missed] == [["b"], ["c"], []]
    assert missed[2].remove == ("b",)
    # nothing else was queued: the next line is the next change
    assert a.post_endpoints({"listen_port": 51820, "endpoints": ["198.51.100.11:51820"]}).status_code == 200
    assert again.delta().base == v + 3
    # up to date: no map at all until something changes
    current = mesh.stream(a, since=v + 4)
    mesh.enroll("d")
    assert [p.name for p in current.delta().upsert] == ["d"]


def test_a_version_the_controller_cannot_continue_from_gets_a_full_map(mesh: Mesh) -> None:
    a = mesh.enroll("a")
    v = full_version(mesh.stream(a))
    assert full_version(mesh.stream(a, since=v + 100)) == v  # from the future (another controller's map)
    assert full_version(mesh.stream(a, since=-1)) == v  # older than any delta kept


def test_reported_endpoints_are_recorded_and_reach_the_other_nodes(mesh: Mesh) -> None:
    a, b = mesh.enroll("a"), mesh.enroll("b")
    stream_b = mesh.stream(b)
    v = full_version(stream_b)
    own_overlay = a.record["addresses"][0]
    report = {"listen_port": 51820, "endpoints": [
        "198.51.100.11:51820",
        "[2001:db8:0:0::11]:51820",  # normalised
        "127.0.0.1:51820",  # loopback: never an endpoint for another host
        "169.254.7.7:51820",  # link-local
        f"{own_overlay}:51820",  # inside the mesh: the tunnel would route through itself
        "198.51.100.11:51820",  # duplicate
    ]}
    answer = a.post_endpoints(report)
    assert answer.status_code == 200, answer.text
    peer = PeerNode.model_validate(answer.json())
    # The controller also adds the source address it observes (here 127.0.0.1 with the listen
    # port), which is loopback and dropped like any other loopback candidate.
    assert peer.endpoints == ("198.51.100.11:51820", "[2001:db8::11]:51820")
    delta = stream_b.delta()
    assert (delta.base, delta.version) == (v, v + 1)
    assert delta.upsert == (peer,)
    # the same report again changes nothing and costs no version
    assert a.post_endpoints(report).status_code == 200
    assert a.post_endpoints({"listen_port": 51821, "endpoints": []}).status_code == 200
    delta = stream_b.delta()
    assert delta.base == v + 1 and delta.upsert[0].endpoints == ()  # only loopback was left: none known
    listed = json.loads(cli("meshctl", "nodes", "list", "--json", env=mesh.controller.env, check=True).stdout)
    assert [n["name"] for n in listed] == ["a", "b"]


MALFORMED: dict[str, Any] = {
    "port 0": {"listen_port": 0, "endpoints": []},
    "port too big": {"listen_port": 65536, "endpoints": []},
    "no listen port": {"endpoints": ["198.51.100.11:51820"]},
    "garbage endpoint": {"listen_port": 51820, "endpoints": ["not an endpoint"]},
    "endpoint without port": {"listen_port": 51820, "endpoints": ["198.51.100.11"]},
    "endpoint port 0": {"listen_port": 51820, "endpoints": ["198.51.100.11:0"]},
    "endpoint port too big": {"listen_port": 51820, "endpoints": ["198.51.100.11:70000"]},
    "host name": {"listen_port": 51820, "endpoints": ["host.example:51820"]},
    "too many": {"listen_port": 51820, "endpoints": [f"198.51.100.{i}:51820" for i in range(33)]},
    "unknown field": {"listen_port": 51820, "endpoints": [], "extra": 1},
    "not an object": [1, 2],
}


def test_malformed_endpoint_reports_are_refused_with_422_and_change_nothing(mesh: Mesh) -> None:
    a, b = mesh.enroll("a"), mesh.enroll("b")
    stream_b = mesh.stream(b)
    v = full_version(stream_b)
    for what, body in MALFORMED.items():
        answer = a.post_endpoints(body)
        assert answer.status_code == 422, (what, answer.text)
        assert answer.json()["error"].startswith(("malformed request", "invalid endpoint")), what
    # no version was spent on a refused report: the next delta follows the full map
    assert a.post_endpoints({"listen_port": 51820, "endpoints": ["198.51.100.11:51820"]}).status_code == 200
    assert stream_b.delta().base == v


def test_only_a_node_may_stream_or_report(controller: Controller) -> None:
    ca = (controller.data / "ca.crt").read_text()
    with httpx.Client(base_url=controller.url, verify=client_ssl_context(ca), trust_env=False,
                      timeout=READ_TIMEOUT) as anonymous:
        assert anonymous.get("/v1/netmap").status_code == 403
        assert anonymous.post("/v1/endpoints", json={"listen_port": 51820}).status_code == 403
    admin = AdminCredential.load(controller.data / "admin.conf")
    with httpx.Client(base_url=controller.url, verify=client_ssl_context(ca, admin.certificate, admin.key),
                      trust_env=False, timeout=READ_TIMEOUT) as http:
        refused = http.get("/v1/netmap")
        assert refused.status_code == 403 and "node only" in refused.json()["error"]


def test_a_dual_stack_controller_sees_an_ipv4_node_as_ipv4(controller: Controller, tmp_path: Path) -> None:
    """Listening on [::], IPv4 clients arrive as ::ffff:a.b.c.d: loopback must still be recognised as loopback."""
    mesh = Mesh(controller, tmp_path / "nodes")
    try:
        a = mesh.enroll("a")
        controller.stop()
        log = (tmp_path / "dual-stack.log").open("wb")
        proc = subprocess.Popen([str(BIN / "mesh-controller"), "serve", "--data", str(controller.data),
                                 "--listen", f"[::]:{controller.port}", "--stun-listen", f"127.0.0.1:{controller.stun}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    answer = a.post_endpoints({"listen_port": 51820, "endpoints": ["198.51.100.11:51820"]})
                    break
                except httpx.TransportError:
                    log_text = (tmp_path / "dual-stack.log").read_text()
                    assert proc.poll() is None and time.monotonic() < deadline, log_text
                    time.sleep(0.05)
            assert answer.status_code == 200, answer.text
            assert answer.json()["endpoints"] == ["198.51.100.11:51820"]  # not "[::ffff:7f00:1]:51820"
        finally:
            proc.kill()
            proc.wait()
            log.close()
    finally:
        mesh.close()


@pytest.mark.parametrize(("announced", "agreed"), [(None, "2"), ("2", "2"), ("3", "3"), ("40", str(PROTOCOL))])
def test_the_stream_opens_in_the_protocol_both_speak(mesh: Mesh, announced: str | None, agreed: str) -> None:
    node = mesh.enroll("db-1")
    headers = {PROTOCOL_HEADER: announced} if announced else {}
    with node.http.stream("GET", "/v1/netmap", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers[PROTOCOL_HEADER] == agreed and resp.headers[SUPPORTED_HEADER] == f"2-{PROTOCOL}"


def test_a_node_older_than_the_controller_serves_is_told_to_upgrade(mesh: Mesh) -> None:
    node = mesh.enroll("db-1")
    refused = node.http.get("/v1/netmap", headers={PROTOCOL_HEADER: "1"})
    assert refused.status_code == 426
    assert refused.json()["error"] == ("node db-1 speaks wire protocol '1'; this controller serves 2 to "
                                       f"{PROTOCOL}: upgrade meshd on db-1")


def test_a_probe_request_reaches_only_the_named_peer_and_names_the_caller(mesh: Mesh) -> None:
    """Call me maybe: the caller comes from its certificate, so no node can make a peer probe a third one."""
    a, b = mesh.enroll("a"), mesh.enroll("b")
    stream_b = mesh.stream(b)
    full_version(stream_b)
    answer = a.http.post("/v1/probe", json={"peer": "b"})
    assert answer.status_code == 200 and answer.json() == {"sent": True}, answer.text
    for line in stream_b._lines:
        message = StreamMessage.model_validate_json(line) if line.strip() else None
        if message is not None and message.type == "probe":
            assert message.probe is not None and message.probe.peer == "a"
            break
    unknown = a.http.post("/v1/probe", json={"peer": "nobody"})
    assert unknown.status_code == 404 and unknown.json()["error"] == "no node named 'nobody' to probe"
    assert a.http.post("/v1/probe", json={"peer": "b", "as": "c"}).status_code == 422  # no field to speak for another
