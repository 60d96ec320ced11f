# -*- test-case-name: tests.test_rpc -*-
"""
Prometheus metrics of one daemon, in its own registry (tests get fresh ones).

Per RPC method: calls by outcome, denials by reason, and latency histograms; the DHCP
server's packets, replies, NAKs, drops and reply latency (L{DhcpMetrics}); the TFTP
server's transfers, bytes and durations (L{TftpMetrics}); served at
C{/metrics} in the Prometheus text format.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class Metrics:
    """
    The daemon's metrics.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        # The process figures read /proc: kept apart, read on a thread
        # (L{refresh_process_figures}) and served as last read (L{process_figures}).
        self.process_registry = CollectorRegistry()
        ProcessCollector(registry=self.process_registry)
        self.process_figures = self.process_text()
        self.rpc_calls = Counter(
            "hypervisor_rpc_calls",
            "RPC calls by method and outcome (ok or error)",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.rpc_transport_calls = Counter(
            "hypervisor_rpc_transport_calls",
            "RPC calls by method, transport (https, srpc) and outcome (ok or error)",
            ["method", "transport", "outcome"],
            registry=self.registry,
        )
        self.srpc_connections = Counter(
            "hypervisor_srpc_connections",
            "SRPC CONNECTs by endpoint and answer (connected, not-found, refused, malformed)",
            ["endpoint", "answer"],
            registry=self.registry,
        )
        self.rpc_denied = Counter(
            "hypervisor_rpc_denied",
            "RPC calls refused by access control",
            ["method", "reason"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "hypervisor_rpc_duration_seconds",
            "RPC call latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.dhcp = DhcpMetrics(self.registry)
        self.tftp = TftpMetrics(self.registry)

    def watch_manager(self, manager: Any) -> None:
        """
        Export the manager's state (VMs, capacity, addresses, libvirt) too.
        """
        self.registry.register(ManagerCollector(manager))

    def text(self) -> bytes:
        """
        All metrics in the Prometheus text format (blocking: reads C{/proc}).
        """
        return self.own_text() + self.process_text()

    def own_text(self) -> bytes:
        """
        The daemon's own metrics (from memory: safe on the reactor thread).
        """
        return generate_latest(self.registry)

    def process_text(self) -> bytes:
        """
        The process figures (CPU, memory, descriptors) read from C{/proc} now
        (blocking: run on a thread).
        """
        return generate_latest(self.process_registry)

    def refresh_process_figures(self) -> None:
        """
        Read the process figures again into L{process_figures}, which C{/metrics}
        serves without reading C{/proc} (blocking: run on a thread).
        """
        self.process_figures = self.process_text()


DHCP_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class DhcpMetrics:
    """
    The DHCP server's counters (L{hypervisor.dhcp.protocol.IDhcpStats}): packets by
    message type and interface, replies by type, NAKs and drops by reason, and the
    time from a request's arrival to its reply.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.packets = Counter(
            "hypervisor_dhcp_packets",
            "DHCP packets received, by message type and interface",
            ["type", "interface"],
            registry=registry,
        )
        self.replies = Counter(
            "hypervisor_dhcp_replies",
            "DHCP replies sent, by message type",
            ["type"],
            registry=registry,
        )
        self.naks = Counter(
            "hypervisor_dhcp_naks", "DHCP NAKs sent, by reason", ["reason"], registry=registry
        )
        self.drops = Counter(
            "hypervisor_dhcp_drops",
            "DHCP packets left unanswered, by reason",
            ["reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "hypervisor_dhcp_reply_seconds",
            "Time from a DHCP request's arrival to its reply",
            buckets=DHCP_LATENCY_BUCKETS,
            registry=registry,
        )

        # Labelled children kept: prometheus_client's labels() per packet cost a tenth
        # of the server's time per request. Kinds are message types and interfaces
        # the server serves, so these stay small.
        self._packets: dict[tuple[str, str], Any] = {}
        self._replies: dict[str, Any] = {}

    def received(self, kind: str, interface: str) -> None:
        """
        A packet of message type C{kind} arrived on C{interface}.
        """
        child = self._packets.get((kind, interface))
        if child is None:
            if len(self._packets) > 4096:
                self._packets.clear()
            child = self._packets[kind, interface] = self.packets.labels(kind, interface)
        child.inc()

    def replied(self, kind: str, seconds: float) -> None:
        """
        A reply of type C{kind} went out C{seconds} after its request came.
        """
        child = self._replies.get(kind)
        if child is None:
            child = self._replies[kind] = self.replies.labels(kind)
        child.inc()
        self.latency.observe(seconds)

    def dropped(self, reason: str) -> None:
        """
        A packet was left unanswered.
        """
        self.drops.labels(reason).inc()

    def nak(self, reason: str) -> None:
        """
        A NAK was sent.
        """
        self.naks.labels(reason).inc()


TFTP_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TFTP_MAX_FILE_LABELS = 64


class TftpMetrics:
    """
    The TFTP server's counters (L{hypervisor.tftp.protocol.ITftpStats}): transfers
    started, completed and failed (by reason), bytes sent, transfer durations by file
    name (at most L{TFTP_MAX_FILE_LABELS} names, then C{other}), requests refused by
    TFTP error code, packets dropped by reason.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started_total = Counter(
            "hypervisor_tftp_transfers_started", "TFTP transfers started", registry=registry
        )
        self.finished_total = Counter(
            "hypervisor_tftp_transfers",
            "TFTP transfers ended, by outcome (completed, timeout, client_error, ...)",
            ["outcome"],
            registry=registry,
        )
        self.bytes = Counter(
            "hypervisor_tftp_sent_bytes", "File bytes TFTP clients acknowledged", registry=registry
        )
        self.duration = Histogram(
            "hypervisor_tftp_transfer_seconds",
            "Duration of completed TFTP transfers, by file name",
            ["file"],
            buckets=TFTP_DURATION_BUCKETS,
            registry=registry,
        )
        self.refusals = Counter(
            "hypervisor_tftp_refused",
            "TFTP requests answered with an error, by TFTP error code",
            ["code"],
            registry=registry,
        )
        self.drops = Counter(
            "hypervisor_tftp_drops",
            "Packets to the TFTP port left unanswered, by reason",
            ["reason"],
            registry=registry,
        )
        self._files: set[str] = set()

    def _file(self, name: str) -> str:
        if name in self._files:
            return name
        if len(self._files) < TFTP_MAX_FILE_LABELS:
            self._files.add(name)
            return name
        return "other"

    def started(self, name: str) -> None:
        """
        A transfer of C{name} started.
        """
        self.started_total.inc()

    def finished(self, name: str, outcome: str, sent: int, seconds: float) -> None:
        """
        A transfer ended with C{outcome} after C{sent} bytes.
        """
        self.finished_total.labels(outcome).inc()
        self.bytes.inc(sent)
        if outcome == "completed":
            self.duration.labels(self._file(name)).observe(seconds)

    def refused(self, code: int) -> None:
        """
        A request got ERROR C{code}.
        """
        self.refusals.labels(str(code)).inc()

    def dropped(self, reason: str) -> None:
        """
        A packet was dropped.
        """
        self.drops.labels(reason).inc()


class ManagerCollector:
    """
    Gauges read from the manager at scrape time: VMs by state, capacity, addresses,
    libvirt connection.
    """

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def describe(self) -> list[Any]:
        """
        No fixed description (collected on demand).
        """
        return []

    def collect(self) -> Iterator[Any]:
        """
        The current values.
        """
        from hypervisor.manager import report

        m = self.manager
        infos = [vm.info for vm in m.vms.values()]
        states = GaugeMetricFamily("hypervisor_vms", "VMs by state", labels=["state"])
        for state, count in report.states(infos).items():
            states.add_metric([state], count)
        yield states
        total_mib, available_mib = m.host.memory()
        used = sum(i.MemoryInMiB for i in infos)
        memory = GaugeMetricFamily("hypervisor_memory_mib", "Host memory in MiB", labels=["kind"])
        memory.add_metric(["total"], total_mib)
        memory.add_metric(["available"], available_mib)
        memory.add_metric(["allocated"], used)
        yield memory
        cpus = GaugeMetricFamily("hypervisor_milli_cpus", "CPU in thousandths", labels=["kind"])
        cpus.add_metric(["total"], m.host.num_cpus() * 1000)
        cpus.add_metric(["allocated"], sum(i.MilliCPUs for i in infos))
        yield cpus
        addresses = GaugeMetricFamily(
            "hypervisor_addresses", "Addresses per subnet", labels=["subnet", "kind"]
        )
        for row in report.pool_by_subnet(
            m.pool.free, m.pool.registered, m._addresses_in_use(), m.subnets
        ):
            addresses.add_metric([row.subnet, "free"], row.free)
            addresses.add_metric([row.subnet, "registered"], row.registered)
            addresses.add_metric([row.subnet, "used"], row.used)
        yield addresses
        yield GaugeMetricFamily(
            "hypervisor_disabled", "1 if the hypervisor is disabled", value=1 if m.disabled else 0
        )
        lv = m.libvirt
        yield GaugeMetricFamily(
            "hypervisor_libvirt_connected",
            "1 while libvirt is connected",
            value=1 if lv.connected else 0,
        )
        yield CounterMetricFamily(
            "hypervisor_libvirt_connects", "Connections established to libvirt", value=lv.connects
        )
        yield CounterMetricFamily(
            "hypervisor_libvirt_disconnects", "Connections to libvirt lost", value=lv.disconnects
        )
