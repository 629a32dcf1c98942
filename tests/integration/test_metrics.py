"""The controller's Prometheus metrics follow what happens."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from .conftest import Controller, cli, free_port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_identity_counts_versions_and_issuance_latency(controller: Controller, tmp_path: Path) -> None:
    port = free_port()
    controller.stop()
    controller.extra = ["--metrics", f"127.0.0.1:{port}"]
    controller.start()
    before = scrape(port)
    assert before["idmesh_nodes"] == 0 and before["idmesh_policy_version"] == 0
    token = controller.token("--tag", "db")
    cli("meshd", "enroll", token, "--name", "db-1", "--state", str(tmp_path / "n"), check=True)
    (tmp_path / "p.yaml").write_text("acls: []\n")
    cli("meshctl", "policy", "apply", str(tmp_path / "p.yaml"), env=controller.env, check=True)
    after = scrape(port)
    assert after["idmesh_nodes"] == 1
    assert after['idmesh_identities_live{kind="node"}'] == 1
    assert after['idmesh_identities_issued_total{kind="node"}'] == 1
    assert after['idmesh_issuance_seconds_count{kind="node"}'] == 1
    assert after["idmesh_netmap_version"] == before["idmesh_netmap_version"] + 1
    assert after["idmesh_policy_version"] == 1
