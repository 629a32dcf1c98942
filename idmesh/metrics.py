"""Prometheus metrics for the controller and meshd (``--metrics HOST:PORT``).

Values that already live in the daemon (versions, counts, handshake ages)
are read when scraped, through a collector, so nothing can drift; events
(issuance, revocation) are counters and a latency histogram updated where
they happen. Each process has its own registry: two daemons in one test
process never mix their numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshcore.errors import InvalidInput, Unavailable

__all__ = ["Metrics", "serve_metrics"]


class _Snapshot(Collector):
    def __init__(self, read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in self._read():
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, help_text, labels=sorted(labels))
            family.add_metric([labels[k] for k in sorted(labels)], value)
        return list(families.values())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.identities_issued = Counter("idmesh_identities_issued_total", "Certificates issued, by kind",
                                         ["kind"], registry=self.registry)
        self.identities_ended = Counter("idmesh_identities_ended_total", "Agent identities ended, by reason",
                                        ["reason"], registry=self.registry)
        self.workload_calls = Counter("idmesh_workload_calls_total", "SPIFFE Workload API answers (a stream counts "
                                      "each update), by method and gRPC code", ["method", "code"],
                                      registry=self.registry)
        self.serve_requests = Counter("idmesh_serve_requests_total", "Requests through meshctl serve, by port "
                                      "and verdict (allow, deny, shadow-mcp, bad, upstream-down)", ["port", "verdict"],
                                      registry=self.registry)
        self.issuance_seconds = Histogram("idmesh_issuance_seconds", "Time to issue a certificate, by kind",
                                          ["kind"], registry=self.registry,
                                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))

    def snapshot(self, read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]) -> None:
        """Add gauges computed at scrape time: ``read`` yields (name, help, labels, value)."""
        self.registry.register(_Snapshot(read))


def serve_metrics(metrics: Metrics, listen: str) -> Any:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInput(f"invalid --metrics {listen!r}: expected HOST:PORT")
    try:
        return start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=metrics.registry)
    except OSError as exc:
        raise Unavailable(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
