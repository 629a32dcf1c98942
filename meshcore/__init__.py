"""The model the controller and the node daemon share: pure Python, no I/O.

Identity (SPIFFE IDs, X509-SVID certificates, scopes), overlay addressing,
enrollment tokens, which controller replica to try next (:mod:`.failover`),
the policy (:mod:`.policy`: file, compiler, decisions), every wire type
(:mod:`.wire`) and the one exception hierarchy (:mod:`.errors`) live here,
so that every decision can be tested with a fixed clock and no network.
It imports nothing of idmesh's other packages (controller, meshd, idmesh,
meshctl, deploy); they all import it.
"""

__version__ = "0.1.0"
