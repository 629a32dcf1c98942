"""The node's record (node.json) keeps every controller replica's URL, and stays readable both ways: a record
an older meshd wrote (one URL) loads, and what this one writes still names the first URL where an older one
looks for it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshd.node.state import NodeRecord, StateDir

A, B, C = "https://ctl-1:8443", "https://ctl-2:8443", "https://ctl-3:8443"

OLD: dict[str, object] = {  # node.json as meshd wrote it before several controllers existed
    "name": "web-1",
    "domain": "acme.mesh",
    "spiffe_id": "spiffe://acme.mesh/node/web-1",
    "controller": A,
    "ca_fingerprint": "3f" * 32,
    "owner": None,
    "tags": ["web"],
    "addresses": ["100.64.0.1", "fd7a:115c:a1e0::1"],
    "blocks": ["100.64.0.0/28", "fd7a:115c:a1e0::/124"],
    "mesh_prefixes": ["100.64.0.0/10", "fd7a:115c:a1e0::/48"],
    "wireguard_public_key": "x" * 43 + "=",
    "enrolled_at": "2026-12-01T10:00:00Z",
}


def state_with(tmp_path: Path, doc: dict[str, object]) -> StateDir:
    state = StateDir(tmp_path)
    state.record.write_text(json.dumps(doc))
    return state


def test_a_record_written_by_an_older_meshd_loads_with_its_one_controller(tmp_path: Path) -> None:
    record = state_with(tmp_path, OLD).read_record()
    assert record.controllers == () and record.urls == (A,)


def test_the_record_keeps_every_controller_across_a_write_and_a_read(tmp_path: Path) -> None:
    state = state_with(tmp_path, OLD)
    state.write_record(state.read_record().with_controllers((A, B, C)))
    assert state.read_record().urls == (A, B, C)


def test_a_new_record_names_the_first_controller_where_an_older_meshd_reads_it(tmp_path: Path) -> None:
    state = state_with(tmp_path, OLD)
    state.write_record(state.read_record().with_controllers((C, A)))
    doc = json.loads(state.record.read_text())
    assert doc["controller"] == C and doc["controllers"] == [C, A]
    # an older meshd's NodeRecord has the same fields but controllers, and ignores fields it does not know
    assert {k: v for k, v in doc.items() if k != "controllers"}.keys() == OLD.keys()


def test_a_record_tolerates_fields_a_newer_meshd_adds(tmp_path: Path) -> None:
    record = state_with(tmp_path, {**OLD, "controllers": [A, B], "added_later": {"x": 1}}).read_record()
    assert record.urls == (A, B)


def test_a_record_never_names_no_controller() -> None:
    record = NodeRecord.model_validate({**OLD, "enrolled_at": datetime(2026, 12, 1, tzinfo=UTC)})
    with pytest.raises(ValueError, match="at least one controller"):
        record.with_controllers(())
