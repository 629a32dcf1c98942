"""The deploy inventory: defaults, per-host overrides, and every problem located as file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.inventory import load_inventory, parse_inventory
from meshcore.errors import InvalidInput, NotFound

REPO = Path(__file__).resolve().parents[2]


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(InvalidInput) as err:
        parse_inventory(text, "hosts.yaml", environ=environ or {})
    return str(err.value).splitlines()


def test_a_minimal_host_gets_the_documented_defaults() -> None:
    inv = parse_inventory("hosts:\n  db-1: {address: 10.0.0.5, tags: [db], known_hosts: ignore}\n", environ={})
    (h,) = inv.hosts
    assert (h.name, h.node_name, h.address, h.port, h.user, h.sudo) == ("db-1", "db-1", "10.0.0.5", 22, "root", False)
    assert (h.service, h.install_dir, h.state, h.socket, h.interface) == (
        "systemd", "/opt/idmesh", "/var/lib/meshd", "/run/meshd/meshd.sock", "idmesh0")
    assert (h.pidfile, h.log) == ("/var/lib/meshd/meshd.pid", "/var/lib/meshd/meshd.log")
    assert h.tags == ("db",) and h.owner is None and h.password is None and not h.check_host_key
    assert h.target == "root@10.0.0.5:22"


def test_defaults_apply_and_a_hosts_own_choices_replace_them(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("key")
    known = tmp_path / "known"
    known.write_text("")
    text = f"""\
defaults:
  user: deploy
  password: from-defaults
  tags: [web]
  known_hosts: known
  service: process
hosts:
  web-1:
    address: 10.0.0.1
  laptop:
    address: laptop.lan
    owner: nikita@acme.com
    key_file: {key}
    node_name: nikita-laptop
    sudo: false
  tagged:
    address: 10.0.0.3
    tags: ["tag:db", ci]
    password_env: TAGGED_PW
    state: /srv/meshd
"""
    inv = parse_inventory(text, "hosts.yaml", base=tmp_path, environ={"TAGGED_PW": "s3cret"})
    web, laptop, tagged = inv.hosts
    assert (web.user, web.sudo, web.password, web.tags, web.service) == ("deploy", True, "from-defaults", ("web",),
                                                                         "process")
    assert web.known_hosts == known and web.check_host_key
    assert (laptop.owner, laptop.tags, laptop.password, laptop.key_file) == ("nikita@acme.com", (), None, key)
    assert (laptop.node_name, laptop.sudo) == ("nikita-laptop", False)
    assert tagged.tags == ("db", "ci") and tagged.password == "s3cret"
    assert (tagged.pidfile, tagged.log) == ("/srv/meshd/meshd.pid", "/srv/meshd/meshd.log")
    assert [h.name for h in inv.select(["tagged", "web-1"])] == ["web-1", "tagged"]
    assert inv.select(None) == inv.hosts


def test_every_problem_is_reported_with_its_location() -> None:
    text = """\
defaults:
  port: 70000
hosts:
  db-1:
    address: 10.0.0.5
    tags: [db]
    owner: a@b.c
    colour: blue
  db-2:
    tags: [db]
    install_dir: opt/idmesh
    known_hosts: ignore
  Bad_Name:
    address: 10.0.0.7
"""
    found = problems(text)
    assert "hosts.yaml:2:9: defaults.port: Input should be less than or equal to 65535" in found
    assert any(p.startswith("hosts.yaml:8:5: hosts.db-1.colour: unknown key 'colour' (expected address, port, user,")
               for p in found), found
    assert "hosts.yaml:13:3: hosts.Bad_Name: 'Bad_Name' is not a node name: use a DNS label (a-z, 0-9, '-', " \
           "at most 63 characters)" in found  # at the key itself


def test_semantic_problems_point_at_the_host_or_the_setting() -> None:
    text = """\
hosts:
  db-1:
    address: 10.0.0.5
    tags: [db]
    owner: a@b.c
    known_hosts: ignore
  db-2:
    tags: [db]
    install_dir: opt/idmesh
    known_hosts: ignore
  db-3:
    address: 10.0.0.7
    known_hosts: ignore
    password_env: NOPE
    interface: much-too-long-name
"""
    assert problems(text) == [
        "hosts.yaml:3:5: hosts.db-1: a node is either tagged or owned by a person: give tags or owner, not both",
        "hosts.yaml:8:5: hosts.db-2: missing required key 'address'",
        "hosts.yaml:9:18: hosts.db-2.install_dir: install_dir must be an absolute path on the host, got 'opt/idmesh'",
        "hosts.yaml:12:5: hosts.db-3: say what the node is: tags: [..] or owner: someone@example.com",
        "hosts.yaml:14:19: hosts.db-3.password_env: environment variable NOPE is not set",
        "hosts.yaml:15:16: hosts.db-3.interface: interface name 'much-too-long-name' is not 1-15 of A-Z a-z 0-9 _ . -",
    ]


def test_duplicates_are_refused() -> None:
    text = """\
defaults: {tags: [db], known_hosts: ignore}
hosts:
  a: {address: 10.0.0.1, node_name: db}
  b: {address: 10.0.0.2, node_name: db}
  c: {address: 10.0.0.1, node_name: c}
"""
    assert problems(text) == [
        "hosts.yaml:4:6: hosts.b: node name 'db' is also the node name of host 'a'",
        "hosts.yaml:5:6: hosts.c: same address, port and state directory as host 'a': both would be the same node",
    ]
    assert problems("hosts:\n  a: {address: x}\n  a: {address: y}\n") == ["hosts.yaml:3:3: hosts: duplicate key 'a'"]


def test_secrets_are_one_of_three() -> None:
    text = "hosts:\n  a: {address: x, tags: [t], known_hosts: ignore, password: p, password_env: P}\n"
    assert problems(text, {"P": "x"}) == [
        "hosts.yaml:2:6: hosts.a: give one of password, password_env, key_file (not password and password_env)"]
    missing = problems("hosts:\n  a: {address: x, tags: [t], known_hosts: ignore, key_file: /nonexistent/key}\n")
    assert missing == ["hosts.yaml:2:61: hosts.a.key_file: no key file at /nonexistent/key"]


@pytest.mark.parametrize(("text", "expected"), [
    ("", "hosts.yaml:1:1: an inventory is a mapping: hosts: (and optionally defaults:)"),
    ("- a\n- b\n", "hosts.yaml:1:1: an inventory is a mapping: hosts: (and optionally defaults:)"),
    ("hosts: {}\n", "hosts.yaml:1:8: hosts: must not be empty"),
    ("hosts:\n  a: {address: [x\n", "hosts.yaml:3:1: while parsing a flow sequence: did not find expected ','"),
    ("hosts:\n  a: {address: x, tags: [Db], known_hosts: ignore}\n",
     "hosts.yaml:2:26: hosts.a.tags[0]: 'Db' is not a tag: use a DNS label"),
    ("hosts:\n  a: {address: x, owner: nikita, known_hosts: ignore}\n",
     "hosts.yaml:2:26: hosts.a.owner: 'nikita' is not a principal: use name@domain"),
    ("hosts:\n  a: {address: x, service: docker, tags: [t]}\n",
     "hosts.yaml:2:28: hosts.a.service: expected 'systemd' or 'process', got 'docker'"),
])
def test_malformed_files(text: str, expected: str) -> None:
    found = problems(text)
    assert found[0].startswith(expected), found


def test_select_unknown_host() -> None:
    inv = parse_inventory("hosts:\n  a: {address: x, tags: [t], known_hosts: ignore}\n", "hosts.yaml", environ={})
    with pytest.raises(InvalidInput, match="no host named b, c"):
        inv.select(["a", "b", "c"])


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no inventory at"):
        load_inventory(tmp_path / "nope.yaml")


def test_the_example_inventory_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    (ssh / "id_ed25519").write_text("key")
    (ssh / "known_hosts").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    inv = load_inventory(REPO / "deploy" / "examples" / "hosts.yaml", environ={"LAPTOP7_PASSWORD": "pw"})
    by_name = {h.name: h for h in inv.hosts}
    assert set(by_name) == {"db-1", "db-2", "agents-1", "exit-eu", "laptop-7", "ci-runner"}
    assert by_name["laptop-7"].owner == "nikita@acme.com" and by_name["laptop-7"].sudo
    assert by_name["laptop-7"].password == "pw" and by_name["laptop-7"].key_file is None
    assert by_name["ci-runner"].service == "process" and by_name["exit-eu"].port == 2222
