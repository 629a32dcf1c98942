"""Shared plumbing of the idmesh commands and daemons: logs, metrics, the HTTP
clients (controller and local meshd), default paths and CLI helpers (one-line
errors, JSON output, path options). It may import :mod:`meshcore` only, and it
holds no commands: ``meshctl`` is the :mod:`meshctl` package."""
