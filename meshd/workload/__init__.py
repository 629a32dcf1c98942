"""The SPIFFE Workload API on every node: agents fetch and rotate their own SVIDs, as SPIRE's agent hands them out.

:mod:`.endpoint` listens on the Unix socket, attests each caller by the
kernel's word (SO_PEERCRED, then the caller's cgroup) and serves the
official gRPC service (py-spiffe's generated ``workload_pb2``, grpcio);
:mod:`.svids` keeps what it hands out: short X509-SVIDs renewed at half
their life, JWT-SVIDs, the bundles.
"""
