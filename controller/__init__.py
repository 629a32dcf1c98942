"""The controller: the mesh's certificate authority, registry, policy server and HTTPS API.

Plumbing at the bottom — the store (``store``, ``migrations``), the CA's data
directory (``authority``), the netmap hub (``netmap``), the enrollment
failure limiter (``ratelimit``), the ASGI ``middleware`` — then ``context``,
which opens them once; above it one module per concern (``auth``,
``tokens``, ``enrollment``, ``nodes``, ``endpoints``, ``policies``,
``routes``, ``agents``, ``workload`` (what nodes' Workload APIs hand out),
``flows``, ``audit``, ``gauges``, ``stream``, and ``certificates``, shared
by enrollment and agents), each plain functions
taking the context first; at the top ``api`` (HTTP only), ``server`` (TLS,
uvicorn) and ``cli`` (``mesh-controller``). Imports point down only: a
concern may use another concern but never the HTTP layer, and the plumbing
and ``context`` use no concern (``tests/unit/test_controller_layers.py``
holds the package to this). Outside the package it may import ``meshcore``
(the pure model it shares with the nodes) and the shared plumbing package
``idmesh`` (logs, metrics, client, paths, cli helpers) — never ``meshd``,
``deploy`` or the ``meshctl`` command.
"""
