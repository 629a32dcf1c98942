"""The mesh interface of a node: who its peers are, what may arrive through it, and who sent it.

:mod:`.dataplane` converges it incrementally from the netmap, the policy
and the verified identities (a node joining is one WireGuard operation and
a few set elements); :mod:`.peers` says what each peer and the link should
be (pure); :mod:`.firewall` renders and installs the policy's table
``inet idmesh``; :mod:`.flowlog` names the sender of logged connections;
:mod:`.discovery` and :mod:`.underlay` find endpoints. May import
:mod:`meshcore`, :mod:`meshd.kernel` and :mod:`meshd.wg`.
"""
