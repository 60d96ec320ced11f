# -*- test-case-name: tests.test_rpc -*-
"""
Prometheus metrics of one daemon, in its own registry (tests get fresh ones).

Per RPC method: calls by outcome, denials by reason, and latency histograms; served at
C{/metrics} in the Prometheus text format.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """
    The daemon's metrics.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.rpc_calls = Counter(
            "hypervisor_rpc_calls", "RPC calls by method and outcome (ok or error)",
            ["method", "outcome"], registry=self.registry)
        self.rpc_denied = Counter(
            "hypervisor_rpc_denied", "RPC calls refused by access control",
            ["method", "reason"], registry=self.registry)
        self.rpc_duration = Histogram(
            "hypervisor_rpc_duration_seconds", "RPC call latency by method",
            ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def text(self) -> bytes:
        """
        All metrics in the Prometheus text format.
        """
        return generate_latest(self.registry)
