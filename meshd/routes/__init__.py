"""Identity-based routes on a node: exit nodes and subnet routers chosen by who is sending.

:mod:`.plan` turns a node's routes into ip rules and routing tables (pure);
:mod:`.tables` installs them; :mod:`.firewall` renders and installs
``inet idmesh_routes`` (gateway grants, NAT, leak prevention);
:mod:`.routing` runs the tunnels to gateways, the gateway interface and
failover. May import :mod:`meshcore`, :mod:`meshd.kernel` and :mod:`meshd.wg`.
"""
