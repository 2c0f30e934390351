"""Prometheus metrics of the agent (prometheus-client); names are part of the interface.

Rules:
- Events the agent sees itself (reconciles, rejections) are ordinary counters and
  histograms, incremented where they happen.
- State the kernel owns (per-peer handshakes and bytes from the WireGuard device, drop
  counters from `table inet tfcrypt`) is sampled after every reconcile and resync into
  `DATAPLANE` and exposed as it was sampled; ages are computed at scrape time. Peers that
  went away disappear from the next scrape instead of lingering as stale series.
- Kernel counters reset when their object is rebuilt (wireguard-go restarted, a damaged
  table rebuilt): they are exported as counters, and `rate()` handles resets.
- Peers are labelled by node name, never by key material.
- The HTTP endpoint is off unless `metrics_address` is set (docs/operations.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tfcrypt.status_view import handshake_state

RECORDS_REJECTED = Counter(
    "tfcrypt_records_rejected_total", "Values read from etcd that were not believed",
    ["reason"])
REJECTIONS_UNREMEMBERED = Counter(
    "tfcrypt_records_rejected_unremembered_total",
    "Rejections counted while the agent's memory of rejected keys was full: each such key "
    "is counted again at every relist (tfcrypt.identity.view)")
WORKLOAD_API_ERRORS = Counter(
    "tfcrypt_workload_api_errors_total", "Problems with the SPIFFE Workload API stream",
    ["reason"])
STATE_PROBLEMS = Counter(
    "tfcrypt_state_problems_total", "Local state that had to be repaired at start", ["what"])
WIREGUARD_RESTARTS = Counter(
    "tfcrypt_wireguard_restarts_total", "Times the WireGuard device vanished and was restarted")
DRIFT_REPAIRS = Counter(
    "tfcrypt_drift_repairs_total",
    "Full applies that found the kernel changed by someone else and repaired it")
RECONCILES = Counter("tfcrypt_reconciles_total", "Dataplane reconciles", ["result"])
RECONCILE_SECONDS = Histogram("tfcrypt_reconcile_duration_seconds",
                              "Time to compute and apply the desired dataplane")
PEERS = Gauge("tfcrypt_peers", "WireGuard peers the selection needs")
SELECTED_PAIRS = Gauge("tfcrypt_selected_pairs",
                       "(local IP, remote IP) pairs that enforce-mode policies select")
LINGERING = Gauge("tfcrypt_lingering_workloads",
                  "Deleted workloads whose addresses stay selected for the grace period "
                  "(workload_grace)")
SVID_EXPIRY = Gauge("tfcrypt_svid_expiry_timestamp_seconds",
                    "When the current X509-SVID expires (unix seconds)")
PEER_ROLLBACK = Gauge(
    "tfcrypt_peer_rollback",
    "1 for each peer whose record in etcd is older than one this agent accepted (a "
    "replayed or restored record, refused)", ["node"])
OWN_RECORD_REFUSED = Gauge(
    "tfcrypt_own_record_refused", "1 if this node's own record in etcd is refused by its "
    "own view (peers refuse it too)")
OWN_RECORD_REASSERTED = Gauge(
    "tfcrypt_own_record_reasserted", "Times this agent put its record back over someone "
    "else's write at its key (since start)")
REFUSED_ADDRESSES = Gauge(
    "tfcrypt_refused_addresses",
    "Workload addresses refused for selection because they are infrastructure, by reason",
    ["reason"])
INFRASTRUCTURE_PREFIXES = Gauge("tfcrypt_infrastructure_prefixes",
                                "Prefixes never selected nor classified (infra_v4/infra_v6)")
FLOW_PACKETS = Counter(
    "tfcrypt_flow_packets_total",
    "Packets of flows between a local and a remote workload, by peer node and verdict "
    "(wireguard, plaintext, guard_drop, ingress_drop; docs/flows.md): per node pair, "
    "never per flow", ["peer", "verdict"])
FLOW_BYTES = Counter(
    "tfcrypt_flow_bytes_total", "Bytes of the same flows, by peer node and verdict",
    ["peer", "verdict"])
FLOW_READ_ERRORS = Counter(
    "tfcrypt_flow_read_errors_total",
    "Reads of the kernel's flow sets that failed or held elements not of their shape",
    ["what"])
FLOW_SETS_FULL = Gauge(
    "tfcrypt_flow_sets_full",
    "Kernel flow sets holding flows_set_size flows: new flows go uncounted until old "
    "ones time out")
FLOW_RECORDS = Gauge("tfcrypt_flow_records", "Flow records the agent keeps")
HEALTHY = Gauge("tfcrypt_healthy", "1 if the agent's health verdict is healthy, else 0")


@dataclass(frozen=True)
class PeerSample:
    node: str
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int


class DataplaneCollector(Collector):
    """The last sample of kernel-owned state, exposed at scrape time."""

    DROPS = {"guard_drops": "guard", "ingress_drops": "strict_ingress",
             "spoof_drops": "spoof"}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: tuple[PeerSample, ...] = ()
        self._counters: dict[str, tuple[int, int]] = {}
        self._svid_expiry: float | None = None

    def update(self, peers: Sequence[PeerSample],
               counters: Mapping[str, tuple[int, int]] | None) -> None:
        """Replace the sample; `counters` None keeps the previous nft counters."""
        with self._lock:
            self._peers = tuple(peers)
            if counters is not None:
                self._counters = dict(counters)

    def set_svid_expiry(self, timestamp: float) -> None:
        with self._lock:
            self._svid_expiry = timestamp
        SVID_EXPIRY.set(timestamp)

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        with self._lock:
            peers, counters, expiry = self._peers, dict(self._counters), self._svid_expiry
        if expiry is not None:
            left = GaugeMetricFamily("tfcrypt_svid_expiry_seconds",
                                     "Seconds until the current X509-SVID expires "
                                     "(negative: expired)")
            left.add_metric([], expiry - now)
            yield left
        by_state = GaugeMetricFamily("tfcrypt_peers_by_handshake",
                                     "Configured peers by handshake state (recent: within "
                                     "180 s)", labels=["state"])
        age = GaugeMetricFamily("tfcrypt_peer_handshake_age_seconds",
                                "Seconds since the latest handshake with a peer",
                                labels=["peer"])
        rx = CounterMetricFamily("tfcrypt_peer_received_bytes",
                                 "Bytes received from a peer through the tunnel",
                                 labels=["peer"])
        tx = CounterMetricFamily("tfcrypt_peer_sent_bytes",
                                 "Bytes sent to a peer through the tunnel", labels=["peer"])
        states = dict.fromkeys(("recent", "stale", "never"), 0)
        for p in peers:
            peer_age = None if p.last_handshake is None else max(0.0, now - p.last_handshake)
            states[handshake_state(peer_age)] += 1
            if peer_age is not None:
                age.add_metric([p.node], peer_age)
            rx.add_metric([p.node], p.rx_bytes)
            tx.add_metric([p.node], p.tx_bytes)
        for state, n in states.items():
            by_state.add_metric([state], n)
        drops = CounterMetricFamily("tfcrypt_dropped_packets",
                                    "Packets dropped by the nftables guards: guard (a marked "
                                    "packet leaving outside the tunnel), strict_ingress (a "
                                    "selected pair arriving in plaintext), spoof (a selected "
                                    "packet whose source does not route back through the "
                                    "interface it came in by)", labels=["reason"])
        drop_bytes = CounterMetricFamily("tfcrypt_dropped_bytes",
                                         "Bytes dropped by the nftables guards",
                                         labels=["reason"])
        for name, reason in self.DROPS.items():
            packets, nbytes = counters.get(name, (0, 0))
            drops.add_metric([reason], packets)
            drop_bytes.add_metric([reason], nbytes)
        audit = CounterMetricFamily("tfcrypt_strict_ingress_audit_packets",
                                    "Plaintext packets of audit-mode pairs that strict "
                                    "ingress would drop")
        audit.add_metric([], counters.get("ingress_audit", (0, 0))[0])
        yield from (by_state, age, rx, tx, drops, drop_bytes, audit)


DATAPLANE = DataplaneCollector()
REGISTRY.register(DATAPLANE)


def serve(host: str, port: int) -> object:
    """Start the scrape endpoint in a daemon thread; returns the server (has shutdown())."""
    server, _thread = start_http_server(port, addr=host)
    return server
