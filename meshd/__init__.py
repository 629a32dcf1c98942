"""meshd, the node daemon: enrollment, tunnels, policy enforcement, agents, identity-based routes.

The packages, bottom up; each imports only from those above it in this list
(and from :mod:`meshcore`, the pure model; :mod:`idmesh`, the shared
plumbing), never from a command-line package:

* :mod:`meshd.kernel` — every raw kernel interface: libnftables, rtnetlink
  (errors, links, addresses and routes), NFLOG, conntrack;
* :mod:`meshd.wg` — WireGuard devices (kernel or wireguard-go) behind one
  idempotent ``apply``;
* :mod:`meshd.mesh` — the mesh interface: its peers, the policy firewall,
  the flow log, LAN discovery, the incremental data plane;
* :mod:`meshd.agents` — agents born here: supervisor, cgroups, their
  marks and source addresses, and the agent identities this node verified;
* :mod:`meshd.routes` — identity-based routes: tunnels to gateways, the
  gateway interface, policy routing, failover;
* :mod:`meshd.node` — the daemon: state directory, enrollment, the
  controller session, what the node knows, the converger, the local API.

:mod:`meshd.settings` and :mod:`meshd.files` are shared by all of them;
:mod:`meshd.cli` is the ``meshd`` command.
"""
