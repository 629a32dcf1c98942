"""What deploy decides to do on a host, from what the probe found: idempotence lives here."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deploy.plan import Desired, HostFacts, NodeFacts, PlanError, Step, plan_host

CA = "a" * 64
WG = "k" * 43 + "="
NODE = NodeFacts("db-1", CA, WG, ("100.64.0.1", "fd00::1"))
WANT = Desired(node_name="db-1", service="process", version="0.1.0", digest="d1", ca_fingerprint=CA,
               state="/var/lib/meshd", controller_nodes={"db-1": WG})
FRESH = HostFacts(python=(3, 11, 2), ensurepip=True)
CURRENT = HostFacts(python=(3, 11, 2), venv=True, deployed_digest="d1", deployed_version="0.1.0", node=NODE,
                    meshd_pid=812)
UNIT = "[Service]\nExecStart=/opt/idmesh/bin/meshd run\n"
SYSTEMD_WANT = replace(WANT, service="systemd", unit_text=UNIT)
SYSTEMD_CURRENT = replace(CURRENT, meshd_pid=None, systemd=True, unit_text=UNIT, unit_active=True, unit_enabled=True)

I, U, UN, E, RE, S, RS = (Step.INSTALL, Step.UPGRADE, Step.UNIT, Step.ENROLL, Step.REENROLL, Step.START,
                          Step.RESTART)


@pytest.mark.parametrize(("facts", "want", "steps"), [
    (FRESH, WANT, [I, E, S]),
    (CURRENT, WANT, []),
    (replace(CURRENT, deployed_digest="d0"), WANT, [U, RS]),                    # another build: reinstall, restart
    (replace(CURRENT, deployed_digest=None), WANT, [I, RS]),                    # a venv deploy did not finish
    (replace(CURRENT, meshd_pid=None), WANT, [S]),                              # stopped: start, nothing else
    (replace(CURRENT, venv=False, deployed_digest=None), WANT, [I, RS]),
    (replace(CURRENT, node=None), WANT, [E, RS]),
    (replace(CURRENT, node=None, meshd_pid=None), WANT, [E, S]),
    (CURRENT, replace(WANT, controller_nodes={}), [RE, RS]),                    # removed at the controller
    (CURRENT, replace(WANT, controller_nodes=None), []),                        # controller list unknown: trust node.json
    (replace(FRESH, systemd=True), SYSTEMD_WANT, [I, UN, E, S]),
    (SYSTEMD_CURRENT, SYSTEMD_WANT, []),
    (replace(SYSTEMD_CURRENT, unit_text=UNIT + "# old\n"), SYSTEMD_WANT, [UN, RS]),
    (replace(SYSTEMD_CURRENT, unit_enabled=False), SYSTEMD_WANT, [UN, RS]),
    (replace(SYSTEMD_CURRENT, unit_active=False), SYSTEMD_WANT, [S]),
    (replace(CURRENT, ensurepip=False), WANT, []),                              # ensurepip only matters for a new venv
])
def test_steps(facts: HostFacts, want: Desired, steps: list[Step]) -> None:
    plan = plan_host(facts, want)
    assert list(plan.steps) == steps
    assert plan.changed == bool(steps)


def test_a_current_host_is_reported_as_such_and_gets_no_token() -> None:
    plan = plan_host(CURRENT, WANT)
    assert not plan.changed and Step.ENROLL not in plan and Step.REENROLL not in plan
    assert plan.notes == ("idmesh 0.1.0 up to date", "already enrolled as db-1 (100.64.0.1)",
                          "meshd running (pid 812)")
    assert plan_host(SYSTEMD_CURRENT, SYSTEMD_WANT).notes[-1] == "meshd.service active"


def test_reenrolment_says_why() -> None:
    plan = plan_host(CURRENT, replace(WANT, controller_nodes={"other": WG}))
    assert "db-1 was removed at the controller: enrolling again with new keys" in plan.notes


@pytest.mark.parametrize(("facts", "want", "reason"), [
    (replace(FRESH, python=None), WANT, "python3 was not found on the host"),
    (replace(FRESH, python=(3, 9, 2)), WANT, "the host has Python 3.9.2; idmesh needs 3.11 or newer"),
    (replace(FRESH, ensurepip=False), WANT, "cannot create virtual environments (apt-get install python3-venv)"),
    (FRESH, SYSTEMD_WANT, "the host does not run systemd: set 'service: process'"),
    (replace(CURRENT, node=replace(NODE, ca_fingerprint="b" * 64)), WANT,
     ("already enrolled in another mesh (CA sha256:bbbbbbbbbbbbbbbb…, this mesh's is sha256:aaaaaaaaaaaaaaaa…): "
      "remove /var/lib/meshd on the host to move it")),
    (replace(CURRENT, node=replace(NODE, name="db-9")), WANT,
     "already enrolled in this mesh as 'db-9', but the inventory names it 'db-1'"),
    (CURRENT, replace(WANT, controller_nodes={"db-1": "x" * 43 + "="}), "another host holds this name"),
    (replace(CURRENT, node=None, node_error="/var/lib/meshd/node.json cannot be read (bad JSON)"), WANT,
     "/var/lib/meshd/node.json cannot be read (bad JSON); move /var/lib/meshd away to enroll this host again"),
])
def test_hosts_that_cannot_be_deployed_say_why(facts: HostFacts, want: Desired, reason: str) -> None:
    with pytest.raises(PlanError) as err:
        plan_host(facts, want)
    assert reason in str(err.value)


def test_facts_from_the_probe_json() -> None:
    doc = {"python": [3, 11, 2], "systemd": False, "uid": 0, "ensurepip": True, "venv": True,
           "deployed": {"wheel": "idmesh-0.1.0-py3-none-any.whl", "version": "0.1.0", "digest": "d1"},
           "node": {"name": "db-1", "ca_fingerprint": CA, "wireguard_public_key": WG,
                    "addresses": ["100.64.0.1", "fd00::1"]},
           "pid": 812}
    assert HostFacts.from_probe(doc) == CURRENT
    assert HostFacts.from_probe({"python": [3, 11, 2], "ensurepip": True, "venv": False, "deployed": None,
                                 "pid": None}) == FRESH
