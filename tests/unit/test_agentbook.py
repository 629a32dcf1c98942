"""A node honors an agent identity only after checking it itself."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshcore.errors import InvalidCertificate
from meshcore.identity import Claims, SpiffeId, build_leaf, cert_pem, new_ca
from meshcore.scopes import parse_scopes
from meshcore.wire.stream import PeerNode
from meshd.agents.book import AgentBook

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
CA = new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), NOW)
NODES = {
    "agents-1": PeerNode(name="agents-1", wireguard_public_key="k" * 43 + "=", addresses=("100.64.0.65", "fd00:0:0:1::1"),
                         blocks=("100.64.0.64/26", "fd00:0:0:1::/64"), tags=("agents",)),
}


def agent_pem(agent_id: str = "a1", node: str = "agents-1", addresses: tuple[str, str] = ("100.64.0.66", "fd00:0:0:1::2"),
              ttl: timedelta = timedelta(minutes=15), ca: object = CA, kind: str = "agent") -> str:
    claims = Claims(kind=kind, node=node, principal="nikita@acme.com", scopes=parse_scopes(["db:read"]),  # type: ignore[arg-type]
                    addresses=addresses, name="helper")
    cert = build_leaf(ca, ed25519.Ed25519PrivateKey.generate().public_key(),  # type: ignore[arg-type]
                      SpiffeId("acme.mesh", kind, agent_id), claims, NOW, ttl)  # type: ignore[arg-type]
    return cert_pem(cert)


def test_a_valid_agent_is_held_and_found_by_address() -> None:
    book = AgentBook(CA.cert)
    held = book.admit(agent_pem(), NODES, NOW)
    assert held.identity.principal == "nikita@acme.com" and held.identity.name == "helper"
    assert book.by_address("100.64.0.66") is held and book.by_address("fd00:0:0:1:0::2") is held


@pytest.mark.parametrize("pem, reason", [
    (lambda: agent_pem(ca=new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), NOW)), "signature"),
    (lambda: agent_pem(addresses=("100.64.0.130", "fd00:0:0:1::2")), "outside node agents-1's agent pool"),
    (lambda: agent_pem(addresses=("100.64.0.65", "fd00:0:0:1::2")), "outside node agents-1's agent pool"),
    (lambda: agent_pem(node="ghost"), "not in the mesh"),
    (lambda: agent_pem(kind="node"), "not an agent certificate"),
])
def test_a_foreign_unbound_or_wrong_certificate_is_refused(pem: object, reason: str) -> None:
    with pytest.raises(InvalidCertificate) as err:
        AgentBook(CA.cert).admit(pem(), NODES, NOW)  # type: ignore[operator]
    assert reason in str(err.value)


def test_expiry_is_enforced_on_the_nodes_own_clock() -> None:
    book = AgentBook(CA.cert)
    book.admit(agent_pem(ttl=timedelta(minutes=1)), NODES, NOW)
    assert book.expire(NOW + timedelta(seconds=59)) == []
    assert book.expire(NOW + timedelta(minutes=1)) == ["a1"]
    assert book.by_address("100.64.0.66") is None
    with pytest.raises(InvalidCertificate, match="expired"):
        book.admit(agent_pem(ttl=timedelta(minutes=1)), NODES, NOW + timedelta(minutes=2))


def test_a_revoked_agent_is_not_readmitted_by_a_late_copy() -> None:
    book = AgentBook(CA.cert)
    pem = agent_pem()
    book.admit(pem, NODES, NOW)
    assert book.drop(["a1"], revoked=True) == ["a1"]
    with pytest.raises(InvalidCertificate, match="revoked"):
        book.admit(pem, NODES, NOW)
    book.replace_all((pem,), NODES, NOW)  # a full update from the controller is authoritative
    assert "a1" in book.agents


def test_an_address_passes_to_a_new_agent_only_after_the_old_one_is_gone() -> None:
    book = AgentBook(CA.cert)
    book.admit(agent_pem("a1"), NODES, NOW)
    book.admit(agent_pem("a2"), NODES, NOW)  # same addresses: the newer certificate wins
    assert set(book.agents) == {"a2"}
    assert book.forget_node("agents-1") == ["a2"] and book.agents == {}


def test_the_same_certificate_again_is_not_verified_again_nor_a_change(monkeypatch: pytest.MonkeyPatch) -> None:
    book, pem = AgentBook(CA.cert), agent_pem(ttl=timedelta(minutes=1))
    assert book.admit_all((pem,), NODES, NOW) == ["a1"]  # born here, say
    verified: list[object] = []
    monkeypatch.setattr("meshd.agents.book.verify_leaf", lambda *args: verified.append(args))
    assert book.admit_all((pem,), NODES, NOW) == []  # the controller's echo: nothing to do
    assert book.admit(pem, NODES, NOW).identity.id == "a1" and verified == []
    monkeypatch.undo()
    book.drop(["a1"], revoked=True)
    with pytest.raises(InvalidCertificate):  # a dropped agent's certificate is checked whole again
        book.admit(pem, NODES, NOW)
    assert book.held(pem, NOW) is None and book.held(pem, NOW + timedelta(minutes=2)) is None
