"""The model the controller and the node daemon share: pure Python, no I/O.

Identity (SPIFFE IDs, X509-SVID certificates, scopes), overlay addressing,
enrollment tokens and the wire types of the HTTP API live here, so that every
decision can be tested with a fixed clock and no network.
"""

__version__ = "0.1.0"
