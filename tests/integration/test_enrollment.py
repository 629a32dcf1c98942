"""Enrollment through the real commands against a real controller over HTTPS."""

from __future__ import annotations

import json
import stat
import subprocess
from datetime import UTC
from pathlib import Path

from cryptography import x509

from meshcore.identity import verify_leaf

from .conftest import BIN, Controller, cli


def enroll(controller: Controller, token: str, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("meshd", "enroll", token, "--state", str(state), *extra)


def test_a_tagged_node_enrolls_and_holds_its_keys_and_certificate(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--tag", "db")
    state = tmp_path / "n1"
    proc = enroll(controller, token, state, "--name", "db-1", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["spiffe_id"] == "spiffe://acme.mesh/node/db-1"
    assert record["tags"] == ["db"] and record["owner"] is None
    for key in ("node.key", "wg.key"):
        assert stat.S_IMODE((state / key).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate((state / "node.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    from datetime import datetime

    ident = verify_leaf(cert, ca, datetime.now(UTC))
    assert ident.claims.tags == ("db",)
    assert list(ident.claims.addresses) == record["addresses"]


def test_nodes_get_distinct_blocks_and_appear_in_the_registry(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--owner", "nikita@acme.com", "--reusable")
    for i in range(3):
        assert enroll(controller, token, tmp_path / f"n{i}", "--name", f"laptop-{i}").returncode == 0
    nodes = json.loads(cli("meshctl", "nodes", "list", "--json", env=controller.env, check=True).stdout)
    assert [n["name"] for n in nodes] == ["laptop-0", "laptop-1", "laptop-2"]
    blocks = [b for n in nodes for b in n["blocks"]]
    assert len(set(blocks)) == len(blocks) == 6
    assert all(n["owner"] == "nikita@acme.com" for n in nodes)


def test_a_single_use_token_works_once(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--tag", "ci")
    assert enroll(controller, token, tmp_path / "a", "--name", "ci-1").returncode == 0
    again = enroll(controller, token, tmp_path / "b", "--name", "ci-2")
    assert again.returncode == 2
    assert again.stderr.strip() == (
        "meshd: error: enrollment token was already used (it is single-use; create another with meshctl token create)"
    )
    assert not (tmp_path / "b" / "node.key").exists()


def test_a_removed_node_loses_its_place_and_its_certificate(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--tag", "db")
    assert enroll(controller, token, tmp_path / "a", "--name", "db-1").returncode == 0
    removed = cli("meshctl", "nodes", "remove", "db-1", env=controller.env)
    assert removed.returncode == 0 and "revoked" in removed.stdout
    assert json.loads(cli("meshctl", "nodes", "list", "--json", env=controller.env).stdout) == []
    missing = cli("meshctl", "nodes", "remove", "db-1", env=controller.env)
    assert missing.returncode == 3 and missing.stderr.strip() == "meshctl: error: no node named 'db-1'"


def test_the_node_name_defaults_to_the_hostname_and_duplicates_are_refused(controller: Controller, tmp_path: Path) -> None:
    import socket

    token = controller.token("--tag", "db", "--reusable")
    assert enroll(controller, token, tmp_path / "a").returncode == 0
    name = socket.gethostname().split(".")[0].lower()
    dup = enroll(controller, token, tmp_path / "b")
    assert dup.returncode == 4
    assert f"a node named {name!r} is already enrolled" in dup.stderr


def test_enrolling_twice_needs_force(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--tag", "db", "--reusable")
    state = tmp_path / "a"
    assert enroll(controller, token, state, "--name", "db-1").returncode == 0
    before = (state / "node.key").read_bytes()
    again = enroll(controller, token, state, "--name", "db-2")
    assert again.returncode == 4 and "already enrolled as 'db-1'" in again.stderr
    assert (state / "node.key").read_bytes() == before
    forced = enroll(controller, token, state, "--name", "db-2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (state / "node.key").read_bytes() != before


def test_token_json_output_is_for_scripts(controller: Controller) -> None:
    out = json.loads(cli("meshctl", "token", "create", "--tag", "db", "--ttl", "15m", "--json",
                         env=controller.env, check=True).stdout)
    assert set(out) >= {"token", "expires", "id", "tags", "reusable"}
    assert out["tags"] == ["db"] and out["reusable"] is False
    listed = json.loads(cli("meshctl", "token", "list", "--json", env=controller.env, check=True).stdout)
    assert [t["id"] for t in listed] == [out["id"]]
    assert "token" not in listed[0]


def test_every_identity_event_is_audited(controller: Controller, tmp_path: Path) -> None:
    
    token = controller.token("--tag", "db")
    assert enroll(controller, token, tmp_path / "a", "--name", "db-1").returncode == 0
    enroll(controller, token, tmp_path / "b", "--name", "db-2")
    cli("meshctl", "nodes", "remove", "db-1", env=controller.env, check=True)
    actions = [r[0] for r in controller.query("SELECT action FROM audit ORDER BY id")]
    details = " ".join(r[0] for r in controller.query("SELECT detail FROM audit"))
    for action in ("ca.created", "token.created", "token.used", "node.enrolled", "certificate.issued",
                   "token.refused", "node.removed", "certificate.revoked"):
        assert action in actions
    assert token.split(".")[1][:20] not in details  # no secret in the audit log


def test_a_node_renews_its_certificate_and_the_old_one_stops_working(controller: Controller, tmp_path: Path) -> None:
    import asyncio
    import ssl

    import httpx

    from meshd.node.session import ControllerSession
    from meshd.node.state import StateDir

    state = tmp_path / "n"
    token = controller.token("--tag", "db")
    assert enroll(controller, token, state, "--name", "db-1").returncode == 0
    old = (state / "node.crt").read_bytes()
    (tmp_path / "old.crt").write_bytes(old)
    session = ControllerSession(StateDir(state), controller.url, lambda: None, print, print, print, print,
                                endpoints=None)  # type: ignore[arg-type]
    asyncio.run(session.renew())
    new = (state / "node.crt").read_bytes()
    assert new != old
    assert stat.S_IMODE((state / "node.key").stat().st_mode) == 0o600
    nodes = json.loads(cli("meshctl", "nodes", "list", "--json", env=controller.env, check=True).stdout)
    assert nodes[0]["cert_not_after"] >= json.loads((state / "node.json").read_text())["enrolled_at"][:19]

    def call_with(cert: Path) -> int:
        ctx = ssl.create_default_context(cafile=str(state / "ca.crt"))
        ctx.load_cert_chain(cert, state / "node.key")
        with httpx.Client(base_url=controller.url, verify=ctx) as http:
            return http.post("/v1/endpoints", json={"listen_port": 51820, "endpoints": []}).status_code

    assert call_with(state / "node.crt") == 200
    assert call_with(tmp_path / "old.crt") == 403


def test_the_audit_log_is_readable_and_filterable(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--tag", "db")
    assert enroll(controller, token, tmp_path / "a", "--name", "db-1").returncode == 0
    cli("meshctl", "nodes", "remove", "db-1", env=controller.env, check=True)
    rows = json.loads(cli("meshctl", "audit", "--node", "db-1", "--json", env=controller.env, check=True).stdout)
    actions = [r["action"] for r in rows]
    assert actions[:3] == ["token.used", "node.enrolled", "certificate.issued"]
    assert "node.removed" in actions and "certificate.revoked" in actions
    assert all("db-1" in (r["target"] or "") + json.dumps(r["detail"]) for r in rows)
    recent = cli("meshctl", "audit", "--since", "10m", "--action", "token", env=controller.env, check=True).stdout
    assert "token.created" in recent and "token.used" in recent and "node.enrolled" not in recent
    bad = cli("meshctl", "audit", "--since", "yesterday-ish", env=controller.env)
    assert bad.returncode == 2 and "expected an ISO time or a duration" in bad.stderr


def test_the_token_can_come_from_standard_input_or_a_file_and_not_the_command_line(controller: Controller,
                                                                                     tmp_path: Path) -> None:
    piped = subprocess.run([str(BIN / "meshd"), "enroll", "-", "--name", "piped", "--state", str(tmp_path / "a")],
                           input=controller.token("--tag", "db") + "\n", capture_output=True, text=True, timeout=60,
                           check=False)
    assert piped.returncode == 0 and "enrolled spiffe://" in piped.stdout, piped.stderr
    token_file = tmp_path / "token"
    token_file.write_text(controller.token("--tag", "db") + "\n")
    filed = cli("meshd", "enroll", "--token-file", str(token_file), "--name", "filed", "--state", str(tmp_path / "b"))
    assert filed.returncode == 0, filed.stderr
    both = cli("meshd", "enroll", "idm1.x", "--token-file", str(token_file), "--state", str(tmp_path / "c"))
    assert both.returncode != 0 and "one of them" in both.stderr and "Traceback" not in both.stderr
    missing = cli("meshd", "enroll", "--token-file", str(tmp_path / "nope"), "--state", str(tmp_path / "c"))
    assert missing.returncode != 0 and "cannot read --token-file" in missing.stderr
    assert {n["name"] for n in json.loads(cli("meshctl", "nodes", "list", "--json", env=controller.env,
                                              check=True).stdout)} >= {"piped", "filed"}
