"""The controller's clock ten minutes ahead of the nodes' (issue 18's fault injection).

Leaves are valid from 30 s before their issue (meshcore.identity.CLOCK_SKEW),
so nothing can make a ten-minute skew work: what is checked is that it fails
clearly. The node says how far off the controller's clock is (log, ``meshctl
status``), and a node refusing an agent's certificate says why, with the time
it would become valid. The controller runs under libfaketime (monotonic time
left real, so its timers run as usual).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from tests.e2e.mesh import Mesh, Node, cmd, wait_until
from tests.e2e.netns import Network
from tests.prerequisites import require

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read"]
    max_ttl: 1h
acls: []
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Node, Node]]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    require("libfaketime", [] if shutil.which("faketime") else ["the faketime command (apt-get install faketime)"])
    with Network(3) as net:
        mesh = Mesh(net, tmp_path_factory.mktemp("clock"), net["h1"],
                    serve=["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", "faketime", "-f", "+10m",
                           cmd("mesh-controller"), "serve"])
        mesh.init(policy=POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        other = mesh.enroll(net["h3"], "other", "--tag", "agents")
        for node in (agents, other):
            mesh.start(node)
        mesh.wait_converged()
        yield mesh, agents, other


def test_a_node_says_how_far_the_controllers_clock_is_off(lab: tuple[Mesh, Node, Node]) -> None:
    _, agents, _ = lab
    offset = agents.status()["controller"]["clock_offset_seconds"]
    assert 590 <= offset <= 610, offset
    assert "s ahead of this node's, more than the 30 s certificates allow" in agents.log.read_text()
    shown = agents.host.run([cmd("meshctl"), "status", "--socket", str(agents.socket)]).stdout
    assert "warning: the controller's clock is" in shown and "ahead of this node's" in shown, shown


def test_an_agent_whose_certificate_is_not_valid_here_yet_is_refused_in_one_line_and_leaves_nothing(
        lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, _ = lab
    done = agents.host.run([cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--principal",
                            "nikita@acme.com", "--scope", "db:read", "--name", "skewed", "--", "true"], check=False)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "not valid before" in line and "by this node's clock" in line, line
    assert "the controller's clock is" in line and "ahead of this node's (set both with NTP)" in line, line
    assert json.loads(agents.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket",
                                       str(agents.socket)]).stdout) == []
    wait_until(lambda: json.loads(mesh.admin("agent", "list", "--mesh", "--json").stdout) == [], 10,
               "the controller to hear the birth failed", mesh.logs)
