"""Route offers at the controller: recorded, validated, audited, streamed, listed with the rules that use them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcore.wire.stream import PeerNode
from meshd.wg import generate_private_key, public_key_of
from tests.integration.conftest import Controller, cli
from tests.integration.test_netmap_stream import Mesh, full_version

POLICY = """\
routes:
  - from: {tag: e2e}
    to: 10.20.0.0/16
    via: [node:gw]
"""
KEY = public_key_of(generate_private_key())


@pytest.fixture
def mesh(controller: Controller, tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(controller, tmp_path)
    try:
        yield m
    finally:
        m.close()


def offer(routes: list[str], key: str | None = KEY, port: int | None = 51821) -> dict[str, object]:
    routing: dict[str, object] = {"routes": routes}
    if key is not None:
        routing["route_key"] = key
    if port is not None:
        routing["gateway_port"] = port
    return {"listen_port": 51820, "endpoints": ["198.51.100.11:51820"], "routing": routing}


def test_an_offer_reaches_every_node_and_is_listed_with_the_rules_that_use_it(mesh: Mesh) -> None:
    gw, other = mesh.enroll("gw"), mesh.enroll("other")
    stream = mesh.stream(other)
    full_version(stream)
    answer = gw.post_endpoints(offer(["10.20.0.0/16", "0.0.0.0/0", "10.20.0.0/16"]))
    assert answer.status_code == 200, answer.text
    peer = PeerNode.model_validate(answer.json())
    assert peer.routing.routes == ("0.0.0.0/0", "10.20.0.0/16") and peer.routing.route_key == KEY
    assert stream.delta().upsert == (peer,) and peer.routing.gateway_port == 51821
    env = mesh.controller.env
    listed = json.loads(cli("meshctl", "routes", "list", "--json", env=env, check=True).stdout)
    assert [(r["node"], r["prefix"], r["exit"], r["enabled_by"]) for r in listed] == [
        ("gw", "0.0.0.0/0", True, []), ("gw", "10.20.0.0/16", False, [])]
    (mesh.tmp / "p.yaml").write_text(POLICY)
    cli("meshctl", "policy", "apply", str(mesh.tmp / "p.yaml"), env=env, check=True)
    listed = json.loads(cli("meshctl", "routes", "list", "--json", env=env, check=True).stdout)
    # 10.20.0.0/16 lies inside both offers: the rule uses either
    assert all(r["enabled_by"][0].startswith("routes[0] at ") for r in listed)
    table = cli("meshctl", "routes", "list", env=env, check=True).stdout
    assert "NODE" in table and "exit" in table and "routes[0]" in table
    audit = json.loads(cli("meshctl", "audit", "--action", "node.routes", "--json", env=env, check=True).stdout)
    assert [a["detail"]["routes"] for a in audit] == [["0.0.0.0/0", "10.20.0.0/16"]]


@pytest.mark.parametrize(("routes", "key", "port", "message"), [
    (["100.64.0.0/16"], KEY, 51821, "overlaps the mesh's own prefix"),
    (["10.20.0.1/16"], KEY, 51821, "host bits set"),
    (["10.20.0.0/16"], None, 51821, "must give its route key and gateway port"),
    (["10.20.0.0/16"], "bm90IGEga2V5", 51821, "is not a base64 X25519 key"),
    (["10.20.0.0/16"], KEY, 0, "malformed request"),
])
def test_a_bad_offer_is_refused_with_one_line_and_changes_nothing(mesh: Mesh, routes: list[str], key: str | None,
                                                                  port: int, message: str) -> None:
    gw, other = mesh.enroll("gw"), mesh.enroll("other")
    stream = mesh.stream(other)
    v = full_version(stream)
    answer = gw.post_endpoints(offer(routes, key, port))
    assert answer.status_code == 422 and message in answer.json()["error"], answer.text
    assert gw.post_endpoints(offer([])).status_code == 200
    assert stream.delta().base == v  # the refused offer spent no version


def test_routes_are_for_the_admin_only(controller: Controller, mesh: Mesh) -> None:
    gw = mesh.enroll("gw")
    assert gw.http.get("/v1/routes").status_code == 403
