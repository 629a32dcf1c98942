"""The controller's API fuzzed from its own OpenAPI document with schemathesis (issue 18).

Every operation, as the admin, as a node and unauthenticated, with a bounded
number of generated requests each (``IDMESH_FUZZ_EXAMPLES``, default 12),
against a real controller over mTLS. Every answer must be no 5xx, have a
status the document lists for the operation, and match the documented
schema. The netmap stream is left out: it answers for as long as the
caller listens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from .conftest import Controller, cli, running_controller

EXAMPLES = int(os.environ.get("IDMESH_FUZZ_EXAMPLES", "12"))
SKIPPED = {("GET", "/v1/netmap")}  # a stream: it does not end while the caller listens


@dataclass
class Lab:
    controller: Controller
    schema: Any
    sessions: dict[str, requests.Session]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with running_controller(tmp / "ctl", tmp / "controller.log") as controller:
        data, url = controller.data, controller.url
        admin = json.loads((data / "admin.conf").read_text())
        (tmp / "admin.crt").write_text(admin["certificate"])
        (tmp / "admin.key").touch(mode=0o600)
        (tmp / "admin.key").write_text(admin["key"])
        cli("meshd", "enroll", controller.token(), "--name", "n1", "--state", str(tmp / "n1"), check=True)
        ca = str(data / "ca.crt")
        sessions = {"admin": requests.Session(), "node": requests.Session(), "anonymous": requests.Session()}
        sessions["admin"].cert = (str(tmp / "admin.crt"), str(tmp / "admin.key"))
        sessions["node"].cert = (str(tmp / "n1" / "node.crt"), str(tmp / "n1" / "node.key"))
        for session in sessions.values():
            session.verify = ca
            session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the mesh CA
        document = sessions["admin"].get(f"{url}/openapi.json", timeout=10).json()
        yield Lab(controller, schemathesis.openapi.from_dict(document), sessions)
        for session in sessions.values():
            session.close()


def fuzz(operation: Any, session: requests.Session, url: str) -> tuple[int, list[str]]:
    """Generate requests for one operation, send each, check each answer: (requests sent, what failed)."""
    sent = 0
    failures: list[str] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        nonlocal sent
        sent += 1
        response = case.call(base_url=url, session=session, timeout=10, verify=session.verify,
                             cert=session.cert)  # (schemathesis would pass its own verify otherwise)
        try:
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                     response_schema_conformance])
        except (Failure, FailureGroup) as exc:  # collected: one report for the whole API
            found = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
            failures.extend(f"{operation.method.upper()} {operation.path} -> {response.status_code}: {f.title}"
                            for f in found)

    call()
    return sent, failures


@pytest.mark.parametrize("who", ["admin", "node", "anonymous"])
def test_no_generated_request_gets_a_5xx_or_an_answer_the_document_does_not_describe(lab: Lab, who: str) -> None:
    sent, fuzzed = 0, 0
    failures: list[str] = []
    for result in lab.schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) not in SKIPPED:
            n, found = fuzz(operation, lab.sessions[who], lab.controller.url)
            sent, fuzzed, failures = sent + n, fuzzed + 1, failures + found
    print(f"{who}: {sent} generated requests to {fuzzed} operations, {len(failures)} failures")
    assert not failures, "\n".join(sorted(set(failures))[:40])
    assert "Traceback" not in lab.controller.log.read_text()


def test_the_document_covers_every_route(lab: Lab) -> None:
    paths = {(op.ok().method.upper(), op.ok().path) for op in lab.schema.get_all_operations()}
    assert ("POST", "/v1/enroll") in paths and ("POST", "/v1/agents/{agent_id}/svid") in paths
    assert len(paths) >= 30
