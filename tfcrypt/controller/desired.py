"""What etcd should hold for a cluster, and the writes that get it there: pure functions.

Rules (docs/controller.md, "What it writes and deletes"):
- The desired state is computed whole from the cluster's objects (level-triggered): a
  missed or reordered watch event cannot leave etcd wrong after the next pass, and a full
  resync is the same pass over a fresh listing.
- The controller owns a record when the controller's own SVID signed it AND its payload
  carries `managed_by: kubernetes` (MANAGED_BY). It creates, updates and deletes owned
  records only: a record `tfcrypt workload set` / `policy apply` wrote, even with the same
  controller identity, is never touched, and a desired key held by such a record is a
  conflict, reported instead of overwritten.
- "Already right" compares parsed records (Workload / EncryptionPolicy `==`: content,
  not bytes, epochs or issue times), so a restarted controller rewrites nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tfcrypt.controller.mapping import PodMapping, map_pod, map_policy
from tfcrypt.errors import ConfigError
from tfcrypt.model.policy import EncryptionPolicy
from tfcrypt.model.workload import Workload

MANAGED_BY = "managed_by"
MANAGER = "kubernetes"

Record = Workload | EncryptionPolicy


@dataclass
class Desired:
    """The records a cluster means, and what was left out and why."""

    records: dict[str, Record] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)         # pod skip reason -> n
    ignored_labels: Counter[str] = field(default_factory=Counter)  # label reason -> n
    skip_details: dict[str, str] = field(default_factory=dict)     # pod key -> why
    policies: dict[str, EncryptionPolicy] = field(default_factory=dict)  # object name ->
    refused: dict[str, str] = field(default_factory=dict)          # object name -> error


def desired_state(pods: Mapping[str, Mapping[str, Any]],
                  namespaces: Mapping[str, Mapping[str, Any]],
                  policies: Mapping[str, Mapping[str, Any]]) -> Desired:
    """Pods (any key), namespaces by name (their labels inherited), EncryptionPolicy
    objects by name -> the records to hold."""
    out = Desired()
    for _, pod in sorted(pods.items()):
        ns = (pod.get("metadata") or {}).get("namespace", "default")
        ns_labels = ((namespaces.get(ns) or {}).get("metadata") or {}).get("labels") or {}
        m: PodMapping = map_pod(pod, ns_labels)
        out.ignored_labels.update(m.ignored)
        if m.workload is None:
            out.skipped[m.skipped or "?"] += 1
            out.skip_details[m.key] = f"{m.skipped}: {m.detail}"
            continue
        out.records[m.key] = m.workload
    for name, obj in sorted(policies.items()):
        parsed = map_policy(obj)
        if isinstance(parsed, ConfigError):
            out.refused[name] = str(parsed)
            continue
        out.policies[name] = parsed
        out.records[parsed.key] = parsed
    return out


@dataclass(frozen=True)
class Plan:
    puts: dict[str, Record]
    deletes: tuple[str, ...]
    conflicts: dict[str, str]  # desired key -> why it is not written

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes


def plan_sync(desired: Mapping[str, Record], owned: Mapping[str, Record],
              held: Mapping[str, str]) -> Plan:
    """The writes that make etcd hold `desired`: `owned` are the believed records this
    controller owns, `held` the other keys present (key -> who holds it), never written."""
    puts: dict[str, Record] = {}
    conflicts: dict[str, str] = {}
    for key, record in desired.items():
        if key in held:
            conflicts[key] = f"{key} is held by {held[key]}: not overwritten"
        elif owned.get(key) != record:
            puts[key] = record
    deletes = tuple(sorted(k for k in owned if k not in desired))
    return Plan(puts, deletes, conflicts)
