"""Prometheus metrics of `tfcrypt controller run`; names are part of the interface.

Rules:
- What the cluster holds that the controller leaves out (skipped pods, ignored labels,
  refused policies, conflicts) is state, recomputed every pass: gauges by reason, so a
  fixed pod stops being counted (docs/controller.md lists the reasons).
- What the controller does (writes, resyncs, failed passes) is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from tfcrypt.controller.desired import Desired, Plan

PODS_SKIPPED = Gauge("tfcrypt_controller_pods_skipped",
                     "Pods without a workload record, by reason", ["reason"])
LABELS_IGNORED = Gauge("tfcrypt_controller_labels_ignored",
                       "Pod and namespace labels that are no tag, by reason", ["reason"])
POLICIES_REFUSED = Gauge("tfcrypt_controller_policies_refused",
                         "EncryptionPolicy objects the parser refuses (not published)")
CONFLICTS = Gauge("tfcrypt_controller_conflicts",
                  "Desired keys held by a record the controller does not own")
IP_CONFLICTS = Gauge("tfcrypt_controller_ip_conflicts",
                     "Addresses listed by more than one pod (published for the newest "
                     "only, or for none on a tie)")
RECORDS = Gauge("tfcrypt_controller_records", "Records the cluster means (workloads and "
                "policies)")
WRITES = Counter("tfcrypt_controller_writes_total", "Writes made, by kind", ["op"])
ERRORS = Counter("tfcrypt_controller_errors_total", "Failed reconcile passes and refused "
                 "writes, by cause", ["cause"])
RESYNCS = Counter("tfcrypt_controller_resyncs_total", "Full listings of a kind, by reason",
                  ["kind", "reason"])


@dataclass
class Last:
    """The last pass's numbers (also for the log and tests)."""

    skipped: dict[str, int] = field(default_factory=dict)
    ignored_labels: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    conflicts: int = 0


LAST = Last()


def _set(gauge: Gauge, before: dict[str, int], now: dict[str, int]) -> None:
    for reason in set(before) | set(now):
        gauge.labels(reason).set(now.get(reason, 0))


def observe(desired: Desired, plan: Plan) -> None:
    skipped, ignored = dict(desired.skipped), dict(desired.ignored_labels)
    _set(PODS_SKIPPED, LAST.skipped, skipped)
    _set(LABELS_IGNORED, LAST.ignored_labels, ignored)
    POLICIES_REFUSED.set(len(desired.refused))
    CONFLICTS.set(len(plan.conflicts))
    IP_CONFLICTS.set(len(desired.ip_conflicts))
    RECORDS.set(len(desired.records))
    LAST.skipped, LAST.ignored_labels = skipped, ignored
    LAST.refused, LAST.conflicts = len(desired.refused), len(plan.conflicts)
