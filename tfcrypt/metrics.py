"""Prometheus metrics of the agent (prometheus-client); names are part of the interface."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS_REJECTED = Counter(
    "tfcrypt_records_rejected_total", "Values read from etcd that were not believed",
    ["reason"])
WORKLOAD_API_ERRORS = Counter(
    "tfcrypt_workload_api_errors_total", "Problems with the SPIFFE Workload API stream",
    ["reason"])
STATE_PROBLEMS = Counter(
    "tfcrypt_state_problems_total", "Local state that had to be repaired at start", ["what"])
RECONCILES = Counter("tfcrypt_reconciles_total", "Dataplane reconciles", ["result"])
RECONCILE_SECONDS = Histogram("tfcrypt_reconcile_duration_seconds",
                              "Time to compute and apply the desired dataplane")
PEERS = Gauge("tfcrypt_peers", "WireGuard peers configured")
SELECTED_PAIRS = Gauge("tfcrypt_selected_pairs",
                       "(local IP, remote IP) pairs that enforce-mode policies select")
SVID_EXPIRY = Gauge("tfcrypt_svid_expiry_timestamp_seconds",
                    "When the current X509-SVID expires (unix seconds)")
