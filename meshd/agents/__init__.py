"""Agents on a node: those born here, and the identities of every agent this node honors.

:mod:`.supervisor` makes a process an agent (key, certificate, address,
cgroup) and ends it; :mod:`.cgroups` holds their cgroups; :mod:`.table`
renders the ``inet idmesh_agents`` table (marks, source translation,
anti-spoofing) and :mod:`.net` installs it; :mod:`.book` keeps the agent
certificates this node verified itself. May import :mod:`meshcore`,
:mod:`meshd.kernel` and :mod:`meshd.files`.
"""
