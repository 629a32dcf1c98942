"""Bad input gets one clear line and a non-zero exit, and changes nothing."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from meshcore.tokens import EnrollmentToken, parse_token

from .conftest import Controller, cli, free_port


def one_line_error(proc: subprocess.CompletedProcess[str], prog: str, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err: str = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: "), err
    return err


def nodes(controller: Controller) -> list[dict[str, object]]:
    return list(json.loads(cli("meshctl", "nodes", "list", "--json", env=controller.env, check=True).stdout))


def reencode(token: EnrollmentToken) -> str:
    return token.encode()


@pytest.mark.parametrize("garbage", ["hello", "idm1.", "idm1.!!!!", "idm1." + base64.urlsafe_b64encode(b"[1,2]").decode(),
                                     "x" * 5000])
def test_garbage_tokens_are_refused_before_any_network_call(tmp_path: Path, garbage: str) -> None:
    err = one_line_error(cli("meshd", "enroll", garbage, "--state", str(tmp_path / "s")), "meshd", 2)
    assert "token" in err
    assert not (tmp_path / "s").exists()


def test_a_tampered_secret_is_refused_and_audited(controller: Controller, tmp_path: Path) -> None:
    good = parse_token(controller.token("--tag", "db"))
    forged = EnrollmentToken(good.url, good.ca_fingerprint, good.id, good.secret[::-1])
    err = one_line_error(cli("meshd", "enroll", forged.encode(), "--state", str(tmp_path / "s"), "--name", "x"),
                         "meshd", 2)
    assert err == "meshd: error: enrollment token is not valid for this mesh"
    assert nodes(controller) == [] and not (tmp_path / "s" / "node.key").exists()
    [(refusals,)] = controller.query("SELECT count(*) FROM audit WHERE action = 'token.refused'")
    assert refusals == 1


def test_a_token_pinning_another_ca_is_refused_by_the_node(controller: Controller, tmp_path: Path) -> None:
    other = tmp_path / "other"
    cli("mesh-controller", "init", "--domain", "evil.mesh", "--data", str(other), "--url", controller.url, check=True)
    foreign_fp = json.loads((other / "admin.conf").read_text())["ca_fingerprint"]
    good = parse_token(controller.token("--tag", "db"))
    foreign = EnrollmentToken(good.url, foreign_fp, good.id, good.secret)
    err = one_line_error(cli("meshd", "enroll", foreign.encode(), "--state", str(tmp_path / "s"), "--name", "x"),
                         "meshd", 5)
    assert "not the" in err and "this token pins" in err
    assert nodes(controller) == []


def test_an_expired_token_is_refused(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--tag", "db", "--ttl", "1s")
    time.sleep(1.2)
    err = one_line_error(cli("meshd", "enroll", token, "--state", str(tmp_path / "s"), "--name", "x"), "meshd", 2)
    assert "enrollment token expired at" in err


def test_a_controller_that_is_not_there_is_named(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    token = EnrollmentToken(url, "ab" * 32, "abcdefgh12", "s" * 43).encode()
    err = one_line_error(cli("meshd", "enroll", token, "--state", str(tmp_path / "s")), "meshd", 6)
    assert f"cannot reach the controller at {url}" in err
    admin = tmp_path / "admin.conf"
    cli("mesh-controller", "init", "--domain", "a.mesh", "--data", str(tmp_path / "d"), "--url", url, check=True)
    admin.write_text((tmp_path / "d" / "admin.conf").read_text())
    err = one_line_error(cli("meshctl", "--admin", str(admin), "nodes", "list"), "meshctl", 6)
    assert f"cannot reach the controller at {url}" in err


def test_init_never_runs_over_an_existing_ca(controller: Controller) -> None:
    before = (controller.data / "ca.key").read_bytes()
    err = one_line_error(cli("mesh-controller", "init", "--domain", "acme.mesh", "--data", str(controller.data)),
                         "mesh-controller", 4)
    assert "already holds a mesh CA" in err
    assert (controller.data / "ca.key").read_bytes() == before


def test_init_into_an_unwritable_place_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = one_line_error(cli("mesh-controller", "init", "--domain", "a.mesh", "--data", str(blocker / "data")),
                         "mesh-controller", 5)
    assert "cannot write to the data directory" in err


def test_init_refuses_bad_values(tmp_path: Path) -> None:
    one_line_error(cli("mesh-controller", "init", "--domain", "Bad Domain!", "--data", str(tmp_path / "a")),
                   "mesh-controller", 2)
    one_line_error(cli("mesh-controller", "init", "--domain", "a.mesh", "--data", str(tmp_path / "b"),
                       "--url", "http://x:1"), "mesh-controller", 2)
    one_line_error(cli("mesh-controller", "init", "--domain", "a.mesh", "--data", str(tmp_path / "c"),
                       "--node-block-v4", "8"), "mesh-controller", 2)
    assert not any((tmp_path / d / "ca.key").exists() for d in "abc")


def test_an_unwritable_state_directory_changes_nothing_at_the_controller(controller: Controller, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    token = controller.token("--tag", "db")
    err = one_line_error(cli("meshd", "enroll", token, "--state", str(blocker / "s"), "--name", "x"), "meshd", 5)
    assert "cannot write to the state directory" in err
    assert nodes(controller) == []


def _api(controller: Controller) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(controller.data / "ca.crt"))
    return httpx.Client(base_url=controller.url, verify=ctx)


def test_oversized_and_malformed_bodies_get_413_and_422_with_a_message(controller: Controller) -> None:
    with _api(controller) as api:
        big = api.post("/v1/enroll", content=b"{" + b" " * 100_000 + b"}", headers={"content-type": "application/json"})
        assert big.status_code == 413 and "too large" in big.json()["error"]
        bad = api.post("/v1/enroll", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 422 and bad.json()["error"].startswith("malformed request")
        missing = api.post("/v1/enroll", json={"token": "x"})
        assert missing.status_code == 422 and "csr" in missing.json()["error"]
        wrong = api.post("/v1/enroll", json={"token": "idm1.x", "csr": "no", "name": "UPPER",
                                             "wireguard_public_key": "x"})
        assert wrong.status_code == 422
        extra = api.post("/v1/tokens", json={"tags": ["db"], "surprise": 1})
        assert extra.status_code in (403, 422)


def test_admin_calls_need_the_admin_certificate(controller: Controller, tmp_path: Path) -> None:
    with _api(controller) as api:
        anon = api.get("/v1/nodes")
    assert anon.status_code == 403 and "client certificate" in anon.json()["error"]
    token = controller.token("--tag", "db")
    cli("meshd", "enroll", token, "--state", str(tmp_path / "n"), "--name", "db-1", check=True)
    ctx = ssl.create_default_context(cafile=str(controller.data / "ca.crt"))
    ctx.load_cert_chain(tmp_path / "n" / "node.crt", tmp_path / "n" / "node.key")
    with httpx.Client(base_url=controller.url, verify=ctx) as node_api:
        as_node = node_api.post("/v1/tokens", json={"tags": ["x"]})
    assert as_node.status_code == 403 and "admin only" in as_node.json()["error"]


def test_an_admin_credential_of_another_mesh_is_not_trusted(controller: Controller, tmp_path: Path) -> None:
    other = tmp_path / "other"
    cli("mesh-controller", "init", "--domain", "acme.mesh", "--data", str(other), "--url", controller.url, check=True)
    err = one_line_error(cli("meshctl", "--admin", str(other / "admin.conf"), "nodes", "list"), "meshctl", 5)
    assert "is not trusted" in err


def test_a_broken_admin_credential_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "admin.conf"
    bad.write_text("{}")
    err = one_line_error(cli("meshctl", "--admin", str(bad), "nodes", "list"), "meshctl", 2)
    assert err == f"meshctl: error: {bad} is not an idmesh admin credential"
    err = one_line_error(cli("meshctl", "--admin", str(tmp_path / "none"), "nodes", "list"), "meshctl", 3)
    assert "no admin credential at" in err


def test_repeated_failures_are_rate_limited(controller: Controller, tmp_path: Path) -> None:
    good = parse_token(controller.token("--tag", "db"))
    forged = EnrollmentToken(good.url, good.ca_fingerprint, good.id, "A" * 43).encode()
    codes = [cli("meshd", "enroll", forged, "--state", str(tmp_path / "s"), "--name", "x").returncode
             for _ in range(11)]
    assert codes[:10] == [2] * 10
    err = one_line_error(cli("meshd", "enroll", good.encode(), "--state", str(tmp_path / "s"), "--name", "x"),
                         "meshd", 5)
    assert "too many failed enrollment attempts" in err


def test_every_answer_carries_a_correlation_id(controller: Controller) -> None:
    with _api(controller) as api:
        mine = api.get("/v1/health", headers={"X-Request-Id": "trace-42"})
        made = api.post("/v1/enroll", content=b"{not json", headers={"content-type": "application/json"})
    assert mine.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 16 and made.status_code == 422


def test_numbers_and_times_out_of_range_are_bad_input_not_a_500(controller: Controller) -> None:
    from idmesh.client import AdminCredential
    from meshcore.errors import InvalidInput

    with AdminCredential.load(controller.data / "admin.conf").client() as admin:
        for path in ("/v1/policy?version=9223372036854775808", "/v1/policy?version=-1"):  # SQLite holds int64
            with pytest.raises(InvalidInput, match="version"):
                admin.request("GET", path)
        with pytest.raises(InvalidInput, match=r"time 0001-01-01T00:00:00\+14:00 is out of range"):
            admin.request("GET", "/v1/audit?since=0001-01-01T00:00:00%2B14:00")  # before year 1 in UTC
    assert "Traceback" not in controller.log.read_text()


def test_an_unauthenticated_call_is_refused_before_its_body_is_read(controller: Controller) -> None:
    junk = b"{" + b"x" * (4 * 1024 * 1024) + b"}"  # a 4 MiB non-policy: it must not even be parsed
    with _api(controller) as api:
        for method, path, body in (("POST", "/v1/policy", junk), ("POST", "/v1/tokens", b'{"surprise": 1}'),
                                   ("POST", "/v1/agents", b"not json")):
            answer = api.request(method, path, content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 403, (path, answer.text)
            assert answer.json()["error"].startswith("this call needs a client certificate"), answer.text
        assert api.get("/v1/health").status_code == 200  # the public calls stay public


def test_a_method_the_path_does_not_take_is_405_with_allow(controller: Controller) -> None:
    from idmesh.client import AdminCredential

    with AdminCredential.load(controller.data / "admin.conf").client() as admin:
        answer = admin._http.put("/v1/nodes")
    assert answer.status_code == 405 and answer.headers.get("allow") == "GET", answer.headers
    assert answer.json()["error"] == "Method Not Allowed"


def _tls_connection(controller: Controller) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(controller.data / "ca.crt"))
    host, port = controller.url.removeprefix("https://").rsplit(":", 1)
    return ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5), server_hostname=host)


def _closed_by_server(conn: ssl.SSLSocket, within: float) -> bool:
    """Whether the server closes (or resets) ``conn`` within ``within`` seconds (0: already); False if open."""
    conn.settimeout(within or None)
    if not within:
        conn.setblocking(False)
    try:
        return conn.recv(1) == b""
    except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def test_half_sent_headers_are_cut_off_and_the_controller_keeps_answering(controller: Controller) -> None:
    from controller.server import HEADER_TIMEOUT

    held = [_tls_connection(controller) for _ in range(50)]
    try:
        for conn in held:
            conn.sendall(b"GET /v1/health HTTP/1.1\r\nHost: controller\r\n")  # and never the rest
        started = time.monotonic()
        with _api(controller) as api:  # fifty slow clients do not keep anyone else waiting
            assert api.get("/v1/health").status_code == 200
        assert not any(_closed_by_server(conn, 0) for conn in held)  # not yet: they have HEADER_TIMEOUT
        time.sleep(max(0.0, HEADER_TIMEOUT - (time.monotonic() - started)))
        assert all(_closed_by_server(conn, 3.0) for conn in held)
    finally:
        for conn in held:
            conn.close()


def test_a_connection_that_never_finishes_its_tls_handshake_is_closed(controller: Controller) -> None:
    """Before, the event loop's 60 s default held it (and its descriptor); uvicorn passes no timeout of its own."""
    from controller.server import TLS_HANDSHAKE_TIMEOUT

    host, port = controller.url.removeprefix("https://").rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(20)]
    try:
        started = time.monotonic()
        with _api(controller) as api:
            assert api.get("/v1/health").status_code == 200
        for conn in silent:
            conn.settimeout(max(0.1, TLS_HANDSHAKE_TIMEOUT + 5 - (time.monotonic() - started)))
            assert conn.recv(1) == b""  # closed by the controller, not by this timeout
        assert time.monotonic() - started >= TLS_HANDSHAKE_TIMEOUT - 1  # and not before its time
    finally:
        for conn in silent:
            conn.close()


def test_one_address_may_hold_only_so_many_connections(controller: Controller) -> None:
    from controller.server import PER_SOURCE

    held, refused = [], 0
    try:
        for _ in range(PER_SOURCE + 8):
            try:
                held.append(_tls_connection(controller))
            except (ConnectionError, ssl.SSLError):
                refused += 1
        time.sleep(0.5)  # the refusals arrive
        refused += sum(_closed_by_server(conn, 0) for conn in held)
        assert refused >= 8, refused  # (more if another test's connection from here is still open)
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.5)  # the server sees them go
    with _api(controller) as api:  # the address's connections closed: it is welcome again
        assert api.get("/v1/health").status_code == 200
