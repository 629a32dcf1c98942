"""meshctl's controller client with several replicas (idmesh.client): a request that cannot connect goes to
the next replica, which is then asked first; one that was answered, or that may have reached a controller, is
never sent to another. admin.conf may list every replica. Plain HTTP servers on loopback stand in for the
replicas (TLS changes nothing here: a failed handshake is a connect error too)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from controller.authority import DataDir, init_data_dir
from idmesh.client import AdminCredential, ControllerClient
from meshcore.errors import InvalidInput, Unavailable, Unreachable

CTX = ssl.create_default_context()
FAST = httpx.Timeout(2.0, connect=1.0)


class Replica:
    """A controller replica that answers every request with ``status`` (after ``delay`` seconds), counting them."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.asked: list[str] = []
        replica = self

        class Answer(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                replica.asked.append(f"{self.command} {self.path}")
                time.sleep(delay)
                body = json.dumps({"port": replica.port}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up waiting (the timeout test)
                    pass

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        replica.close()


def dead_url() -> str:
    """A loopback port nothing listens on: connecting is refused at once, as to a replica killed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_refused_replica_is_skipped_and_the_one_that_answered_is_asked_first_next(replicas: list[Replica]) -> None:
    live = Replica()
    replicas.append(live)
    dead = dead_url()
    with ControllerClient([dead, live.url], CTX, FAST) as client:
        assert client.request("GET", "/v1/nodes") == {"port": live.port}
        assert client.url == live.url
        assert client.request("POST", "/v1/tokens", {"ttl": 60}) == {"port": live.port}
    assert live.asked == ["GET /v1/nodes", "POST /v1/tokens"]


def test_an_answer_of_any_status_is_final_and_no_other_replica_is_asked(replicas: list[Replica]) -> None:
    busy, other = Replica(status=503), Replica()
    replicas.extend((busy, other))
    with ControllerClient([busy.url, other.url], CTX, FAST) as client, pytest.raises(Unavailable, match="503"):
        client.request("POST", "/v1/policy", {"text": ""})
    assert busy.asked == ["POST /v1/policy"] and other.asked == []


def test_a_post_whose_answer_times_out_is_not_sent_again_elsewhere(replicas: list[Replica]) -> None:
    slow, other = Replica(delay=1.5), Replica()
    replicas.extend((slow, other))
    with (ControllerClient([slow.url, other.url], CTX, httpx.Timeout(0.5)) as client,
          pytest.raises(Unavailable, match="did not answer in time") as failed):
        client.request("POST", "/v1/tokens", {"ttl": 60})
    assert not isinstance(failed.value, Unreachable)  # it may have been done: not for another replica
    assert slow.asked == ["POST /v1/tokens"] and other.asked == []


def test_when_no_replica_can_be_reached_one_line_names_each() -> None:
    first, second = dead_url(), dead_url()
    with ControllerClient([first, second], CTX, FAST) as client, pytest.raises(Unreachable) as failed:
        client.request("GET", "/v1/nodes")
    message = str(failed.value)
    assert "\n" not in message and message.startswith("no controller replica can be reached: ")
    assert f"cannot reach the controller at {first}: " in message and f"at {second}: " in message


def test_a_single_controller_fails_as_it_always_did() -> None:
    url = dead_url()
    with ControllerClient(url, CTX, FAST) as client, pytest.raises(Unavailable) as failed:
        client.request("GET", "/v1/nodes")
    assert str(failed.value) == f"cannot reach the controller at {url}: Connection refused"


@pytest.fixture
def admin_conf(tmp_path: Path) -> Path:
    init_data_dir(tmp_path, "acme.mesh", "https://127.0.0.1:8443", datetime.now(UTC))
    return DataDir(tmp_path).admin_conf


def edit(path: Path, **fields: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_an_admin_conf_with_one_url_lists_just_it(admin_conf: Path) -> None:
    assert AdminCredential.load(admin_conf).urls == ("https://127.0.0.1:8443",)


def test_an_admin_conf_lists_every_replica_url_first(admin_conf: Path) -> None:
    edit(admin_conf, url="https://ctl-2:8443", urls=["https://ctl-2:8443", "https://ctl-1:8443"])
    cred = AdminCredential.load(admin_conf)
    assert cred.url == "https://ctl-2:8443" and cred.urls == ("https://ctl-2:8443", "https://ctl-1:8443")
    assert cred.client().urls == cred.urls


@pytest.mark.parametrize("urls", ["https://ctl-2:8443", [1, 2], {"a": "https://ctl-2:8443"}, [None]])
def test_an_admin_conf_whose_urls_are_not_a_list_of_strings_is_refused(admin_conf: Path, urls: object) -> None:
    edit(admin_conf, urls=urls)
    with pytest.raises(InvalidInput, match='"urls" is not a list of controller URLs'):
        AdminCredential.load(admin_conf)
