"""The UAPI text: what we send (golden), what we read (an answer captured from wireguard-go 0.0.20220316)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from meshcore.errors import InvalidInput, Unavailable
from meshd.wg import AddPeer, Op, PeerConfig, RemovePeer, SetDevice, UpdatePeer
from meshd.wg.uapi import UapiClient, parse_get, render_set

K1 = base64.b64encode(bytes([1] * 32)).decode()
K2 = base64.b64encode(bytes([2] * 32)).decode()
H1, H2 = "01" * 32, "02" * 32
PRIVATE_HEX = "8002863f91329445082ee124fe4369806144a1030c4b888d1062d089e4055458"

CAPTURED = f"""private_key={PRIVATE_HEX}
listen_port=51820
public_key={H1}
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=198.51.100.1:51820
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500000000
tx_bytes=92
rx_bytes=148
persistent_keepalive_interval=25
allowed_ip=fd00::/64
allowed_ip=100.64.0.0/26
public_key={H2}
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=[2001:db8::1]:1234
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
errno=0

"""


def test_render_set_is_incremental_text() -> None:
    ops: list[Op] = [
        SetDevice(base64.b64encode(bytes.fromhex(PRIVATE_HEX)).decode(), 51820),
        RemovePeer(K2),
        UpdatePeer(K1, endpoint="[2001:db8::1]:51820", persistent_keepalive=0, allowed_ips=()),
        AddPeer(PeerConfig(K2, ("100.64.0.64/26",), "198.51.100.12:51820", 25)),
    ]
    assert render_set(ops) == (
        "set=1\n"
        f"private_key={PRIVATE_HEX}\nlisten_port=51820\n"
        f"public_key={H2}\nremove=true\n"
        f"public_key={H1}\nupdate_only=true\nendpoint=[2001:db8::1]:51820\npersistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        f"public_key={H2}\nendpoint=198.51.100.12:51820\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=100.64.0.64/26\n"
        "\n"
    )
    assert "replace_peers" not in render_set(ops)


def test_device_lines_cannot_follow_a_peer() -> None:
    with pytest.raises(ValueError):
        render_set([RemovePeer(K1), SetDevice(None, 1)])


def test_parse_a_wireguard_go_answer() -> None:
    state = parse_get(CAPTURED, "wg0")
    assert state.listen_port == 51820 and state.public_key is not None
    one, two = state.peers
    assert one.public_key == K1 and one.endpoint == "198.51.100.1:51820"
    assert one.latest_handshake == datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)
    assert (one.rx_bytes, one.tx_bytes, one.persistent_keepalive) == (148, 92, 25)
    assert one.allowed_ips == ("fd00::/64", "100.64.0.0/26")
    assert two.endpoint == "[2001:db8::1]:1234" and two.latest_handshake is None
    assert two.persistent_keepalive is None and two.allowed_ips == ()


def test_a_fresh_device_has_no_key() -> None:
    state = parse_get("listen_port=40000\nerrno=0\n\n", "wg0")
    assert (state.public_key, state.listen_port, state.peers) == (None, 40000, ())


class _Answer:
    def __init__(self, answer: str | Exception) -> None:
        self.answer = answer

    def request(self, message: str) -> str:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(("answer", "error", "message"), [
    ("errno=-22\n\n", InvalidInput, "wg7 refused the configuration .EINVAL."),
    ("errno=-5\n\n", Unavailable, "wg7: UAPI request failed .EIO."),
    ("", Unavailable, "EIO"),  # the daemon hung up mid-answer
    (ConnectionRefusedError(111, "Connection refused"), Unavailable, "wg7: UAPI socket not answering"),
    (FileNotFoundError(2, "No such file"), Unavailable, "wg7"),
])
def test_errors_name_the_interface(answer: str | Exception, error: type[Exception], message: str) -> None:
    client = UapiClient("wg7", _Answer(answer))
    with pytest.raises(error, match=message):
        client.set([RemovePeer(K1)])
