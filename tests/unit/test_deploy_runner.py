"""The orchestration, against in-memory hosts and controller: failures stay with their host,
tokens are made only for hosts that enroll, a second run changes nothing."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from deploy.artifacts import Wheel
from deploy.inventory import HostSpec, parse_inventory
from deploy.plan import HostFailure
from deploy.progress import PlainProgress
from deploy.runner import DeployOptions, HostResult, deploy_all, summarize
from meshcore.errors import Unavailable

CA = "c" * 64


class FakeHost:
    """A host as the probe sees it; each step changes it the way the real one would."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.doc: dict[str, Any] = {"python": [3, 11, 2], "ensurepip": True, "venv": False, "deployed": None,
                                    "pid": None}
        self.calls: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.next_pid = 100

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name.split()[0] in self.fail:
            raise self.fail[name.split()[0]]

    async def probe(self) -> dict[str, Any]:
        self._step("probe")
        return dict(self.doc)

    async def install(self, wheels: list[Path], project: Wheel, *, venv_exists: bool) -> None:
        self._step("install")
        assert wheels[0] == project.path
        self.doc.update(venv=True, deployed={"version": project.version, "digest": project.digest})

    async def install_unit(self, text: str) -> None:
        self._step("unit")

    async def enroll(self, token: str, *, force: bool) -> dict[str, Any]:
        self._step(f"enroll {token}" + (" --force" if force else ""))
        addresses = [f"100.64.0.{len(self.name)}", "fd00::1"]
        self.doc["node"] = {"name": self.name, "ca_fingerprint": CA, "wireguard_public_key": f"wg-{self.name}",
                            "addresses": addresses}
        return {"name": self.name, "addresses": addresses}

    async def start(self, *, restart: bool) -> int | None:
        self._step("restart" if restart else "start")
        self.next_pid += 1
        self.doc["pid"] = self.next_pid
        return self.next_pid


class FakeAdmin:
    ca_fingerprint = CA

    def __init__(self, hosts: dict[str, FakeHost]) -> None:
        self.hosts = hosts
        self.tokens: list[tuple[str, tuple[str, ...], str | None]] = []
        self.deleted: list[str] = []
        self.fail_tokens = False

    async def nodes(self) -> dict[str, str]:
        return {h.name: h.doc["node"]["wireguard_public_key"] for h in self.hosts.values() if h.doc.get("node")}

    async def create_token(self, tags: tuple[str, ...], owner: str | None) -> tuple[str, str]:
        if self.fail_tokens:
            raise Unavailable("cannot reach the controller at https://ctl:8443: connection refused")
        token_id = f"t{len(self.tokens) + 1}"
        self.tokens.append((token_id, tags, owner))
        return token_id, f"idm1.{token_id}"

    async def delete_token(self, token_id: str) -> None:
        self.deleted.append(token_id)


class FakeArtifacts:
    def __init__(self, tmp: Path) -> None:
        path = tmp / "idmesh-0.1.0-py3-none-any.whl"
        path.write_bytes(b"wheel")
        dep = tmp / "dep-1.0-py3-none-any.whl"
        dep.write_bytes(b"dep")
        self.wheel = Wheel(path, "idmesh", "0.1.0", "digest-1")
        self.dep = dep
        self.collected = 0

    def project(self) -> Wheel:
        return self.wheel

    async def uploads(self) -> list[Path]:
        self.collected += 1
        return [self.wheel.path, self.dep]


INVENTORY = """\
defaults: {service: process, known_hosts: ignore, tags: [e2e]}
hosts:
  alpha: {address: 10.0.0.1}
  bravo: {address: 10.0.0.2, owner: nikita@acme.com}
  charlie: {address: 10.0.0.3}
"""


class World:
    def __init__(self, tmp: Path) -> None:
        self.specs = parse_inventory(INVENTORY, "hosts.yaml", environ={}).hosts
        self.hosts = {s.name: FakeHost(s.name) for s in self.specs}
        self.admin = FakeAdmin(self.hosts)
        self.artifacts = FakeArtifacts(tmp)
        self.unreachable: set[str] = set()

    @asynccontextmanager
    async def connect(self, spec: HostSpec) -> AsyncIterator[FakeHost]:
        if spec.name in self.unreachable:
            raise HostFailure(f"unreachable: {spec.address}:{spec.port} refused the connection (is sshd running?)")
        yield self.hosts[spec.name]

    def run(self, *, dry_run: bool = False) -> tuple[dict[str, HostResult], str]:
        out = io.StringIO()
        opts = DeployOptions(artifacts=self.artifacts, admin=self.admin, connect=self.connect,  # type: ignore[arg-type]
                             progress=PlainProgress(out), parallel=2, dry_run=dry_run)
        results = asyncio.run(deploy_all(self.specs, opts))
        return {r.host: r for r in results}, out.getvalue()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_failing_host_is_reported_and_the_others_are_deployed(world: World) -> None:
    world.unreachable.add("charlie")
    results, shown = world.run()
    for name in ("alpha", "bravo"):
        r = results[name]
        assert r.ok and r.status == "installed" and r.actions == ["install", "enroll", "start"], r
        probe, install, enroll, start = world.hosts[name].calls
        assert (probe, install, start) == ("probe", "install", "start") and enroll.startswith("enroll idm1.t")
    charlie = results["charlie"]
    assert (charlie.ok, charlie.status, charlie.step) == (False, "failed", "connect")
    assert charlie.reason == "unreachable: 10.0.0.3:22 refused the connection (is sshd running?)"
    assert world.hosts["charlie"].calls == []
    # one single-use token per enrolled host, with that host's tags or owner
    assert sorted((tags, owner) for _, tags, owner in world.admin.tokens) == [((), "nikita@acme.com"), (("e2e",), None)]
    assert world.artifacts.collected == 2  # wheels collected on demand (cached by the real Artifacts)
    assert "charlie: FAILED: connect: unreachable: 10.0.0.3:22 refused the connection" in shown
    assert "alpha: ok: installed idmesh 0.1.0; enrolled as alpha (100.64.0.5); meshd started (pid 101)" in shown
    assert summarize(list(results.values())) == "3 host(s): 2 installed, 1 failed; failed: charlie"


def test_a_second_run_changes_nothing_and_makes_no_token(world: World) -> None:
    world.run()
    tokens = len(world.admin.tokens)
    for host in world.hosts.values():
        host.calls.clear()
    results, _ = world.run()
    assert len(world.admin.tokens) == tokens == 3
    for name, r in results.items():
        assert r.ok and r.status == "unchanged" and r.actions == [] and r.pid == 101
        assert r.summary == f"unchanged: idmesh 0.1.0 up to date; already enrolled as {name} " \
                            f"(100.64.0.{len(name)}); meshd running (pid 101)"
        assert world.hosts[name].calls == ["probe"]


def test_a_stopped_meshd_is_started_and_a_removed_node_enrolled_again(world: World) -> None:
    world.run()
    world.hosts["alpha"].doc["pid"] = None
    del world.hosts["bravo"].doc["node"]  # stand-in for "the controller forgot it": its list is derived from hosts
    bravo_node = {"name": "bravo", "ca_fingerprint": CA, "wireguard_public_key": "wg-bravo", "addresses": ["x"]}
    world.admin.nodes = _without("bravo", world.admin.nodes)  # type: ignore[method-assign]
    world.hosts["bravo"].doc["node"] = bravo_node
    results, _ = world.run()
    assert results["alpha"].actions == ["start"] and results["alpha"].status == "updated"
    assert results["bravo"].actions == ["reenroll", "restart"]
    assert world.hosts["bravo"].calls[-2:] == ["enroll idm1.t4 --force", "restart"]
    assert results["charlie"].status == "unchanged"


def _without(name: str, nodes: Any) -> Any:
    async def listed() -> dict[str, str]:
        return {k: v for k, v in (await nodes()).items() if k != name}
    return listed


def test_a_failed_enrollment_deletes_its_token_and_names_the_step(world: World) -> None:
    world.hosts["bravo"].fail["enroll"] = HostFailure("meshd enroll failed: the token is expired")
    world.hosts["alpha"].fail["probe"] = RuntimeError("boom")
    results, _ = world.run()
    bravo = results["bravo"]
    assert (bravo.ok, bravo.step, bravo.reason) == (False, "enroll", "meshd enroll failed: the token is expired")
    assert bravo.actions == ["install"]  # what was done before it failed
    assert [t for t, _, owner in world.admin.tokens if owner] == world.admin.deleted  # bravo's token, and only it
    alpha = results["alpha"]
    assert (alpha.step, alpha.reason) == ("probe", "internal error: RuntimeError: boom")
    assert results["charlie"].ok


def test_a_controller_failure_fails_only_the_hosts_that_need_it(world: World) -> None:
    world.run()
    world.hosts["charlie"].doc.pop("node")
    world.admin.fail_tokens = True
    results, _ = world.run()
    assert results["alpha"].status == results["bravo"].status == "unchanged"
    assert results["charlie"].step == "token" and "cannot reach the controller" in (results["charlie"].reason or "")


def test_dry_run_only_probes(world: World) -> None:
    results, _ = world.run(dry_run=True)
    assert all(r.status == "planned" and r.summary == "would do: install, enroll, start" for r in results.values())
    assert world.admin.tokens == [] and all(h.calls == ["probe"] for h in world.hosts.values())


def test_results_as_json(world: World) -> None:
    world.unreachable.add("charlie")
    results, _ = world.run()
    doc = results["alpha"].to_json()
    assert doc | {"seconds": 0} == {
        "host": "alpha", "target": "root@10.0.0.1:22", "ok": True, "status": "installed", "changed": True,
        "actions": ["install", "enroll", "start"], "step": None, "reason": None, "meshd_pid": 101, "seconds": 0,
        "summary": "installed idmesh 0.1.0; enrolled as alpha (100.64.0.5); meshd started (pid 101)",
        "node": {"name": "alpha", "addresses": ["100.64.0.5", "fd00::1"]}}
    assert results["charlie"].to_json()["changed"] is False
