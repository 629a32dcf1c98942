"""``meshd enroll TOKEN``: join a mesh.

Keys are generated here, in memory, and written only after the controller
has accepted the enrollment, so a refused token changes nothing on disk.
The controller's CA is trusted only if its fingerprint is the one the token
pins; the identity key is proven by the CSR's signature. A token naming
several controller replicas is tried at each in turn, and the record keeps
them all (SPEC §8).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519

from idmesh.client import ControllerClient, client_ssl_context, fetch_ca
from meshcore.errors import Conflict, InvalidInput
from meshcore.identity import NODE_NAME, build_csr
from meshcore.tokens import parse_token
from meshcore.wire.api import EnrollRequest, EnrollResponse
from meshd.node.state import NodeRecord, StateDir
from meshd.wg.model import generate_private_key, public_key_of

__all__ = ["default_node_name", "enroll"]


def default_node_name() -> str:
    """The hostname's first label, lower-cased: what a node is called unless told."""
    return socket.gethostname().split(".")[0].lower()


@dataclass(frozen=True)
class Enrolled:
    response: EnrollResponse
    state: StateDir


def enroll(token_line: str, state: StateDir, name: str | None = None, force: bool = False) -> Enrolled:
    token = parse_token(token_line)
    name = name or default_node_name()
    if not NODE_NAME.match(name):
        raise InvalidInput(f"invalid node name {name!r}: use a DNS label (a-z, 0-9, '-', at most 63 characters)")
    if state.enrolled() and not force:
        record = state.read_record()
        raise Conflict(f"this node is already enrolled as {record.name!r} in {state.path}; "
                       "use --force to enroll again with new keys")
    state.ensure()

    ca_pem = fetch_ca(token.urls, token.ca_fingerprint)
    node_key = ed25519.Ed25519PrivateKey.generate()
    wg_private = generate_private_key()
    wg_public = public_key_of(wg_private)
    request = EnrollRequest(token=token_line.strip(), csr=build_csr(node_key), wireguard_public_key=wg_public,
                            name=name)
    with ControllerClient(token.urls, client_ssl_context(ca_pem)) as client:
        answer = EnrollResponse.model_validate(client.request("POST", "/v1/enroll", request.model_dump()))
    record = NodeRecord(
        name=answer.node.name,
        domain=answer.domain,
        spiffe_id=answer.node.spiffe_id,
        controller=token.url,
        controllers=token.urls,
        ca_fingerprint=token.ca_fingerprint,
        owner=answer.node.owner,
        tags=tuple(answer.node.tags),
        addresses=(answer.node.addresses[0], answer.node.addresses[1]),
        blocks=(answer.node.blocks[0], answer.node.blocks[1]),
        mesh_prefixes=(answer.mesh_prefixes[0], answer.mesh_prefixes[1]),
        wireguard_public_key=wg_public,
        enrolled_at=answer.node.enrolled_at,
    )
    state.write(node_key, wg_private, answer.certificate, answer.ca, record)
    return Enrolled(answer, state)

