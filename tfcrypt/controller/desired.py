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
- One address listed by several pods (an IP that moved while the old pod's status still
  lists it) is published for the newest claimant only: the pod with the latest
  (status.startTime, metadata.creationTimestamp). Kubernetes gives an IP to a new pod
  only after the old pod's sandbox released it, so the older status is stale; publishing
  both would let the old pod's tags select traffic that now reaches the new pod (and,
  across nodes, give the IP to no peer). On a tie nobody can tell: the address is
  published for neither. A pod left without any address is skipped (`ip-conflict`);
  every contested address is counted (`Desired.ip_conflicts`).
- "Already right" compares parsed records (Workload / EncryptionPolicy `==`: content,
  not bytes, epochs or issue times), so a restarted controller rewrites nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tfcrypt.controller.mapping import IP_CONFLICT, PodMapping, map_pod, map_policy
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
    ip_conflicts: dict[str, str] = field(default_factory=dict)     # contested IP -> who


def desired_state(pods: Mapping[str, Mapping[str, Any]],
                  namespaces: Mapping[str, Mapping[str, Any]],
                  policies: Mapping[str, Mapping[str, Any]]) -> Desired:
    """Pods (any key), namespaces by name (their labels inherited), EncryptionPolicy
    objects by name -> the records to hold."""
    out = Desired()
    ages: dict[str, tuple[str, str]] = {}
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
        ages[m.key] = pod_age(pod)
    _resolve_ip_conflicts(out, ages)
    for name, obj in sorted(policies.items()):
        parsed = map_policy(obj)
        if isinstance(parsed, ConfigError):
            out.refused[name] = str(parsed)
            continue
        out.policies[name] = parsed
        out.records[parsed.key] = parsed
    return out


def pod_age(pod: Mapping[str, Any]) -> tuple[str, str]:
    """What orders two pods listing one IP: (status.startTime, creationTimestamp), both
    RFC 3339 UTC strings as the API server writes them (so they compare as text)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return (str(status.get("startTime") or ""), str(meta.get("creationTimestamp") or ""))


def _resolve_ip_conflicts(out: Desired, ages: Mapping[str, tuple[str, str]]) -> None:
    """Each IP listed by several pod records stays only in the newest one's (none on a
    tie); a record left without addresses is dropped and counted as skipped."""
    claims: dict[str, list[str]] = {}
    for key, record in out.records.items():
        if isinstance(record, Workload):
            for ip in record.ips:
                claims.setdefault(ip, []).append(key)
    losers: dict[str, set[str]] = {}  # pod key -> IPs it loses
    for ip, keys in sorted(claims.items()):
        if len(keys) < 2:
            continue
        ranked = sorted(keys, key=lambda k: ages[k], reverse=True)
        tie = ages[ranked[0]] == ages[ranked[1]]
        winner = None if tie else ranked[0]
        for key in keys:
            if key != winner:
                losers.setdefault(key, set()).add(ip)
        names = ", ".join(k.removeprefix("workloads/") for k in sorted(keys))
        out.ip_conflicts[ip] = (f"{ip} listed by {names}: " + (
            "same age, published for neither" if winner is None else
            f"published for the newest, {winner.removeprefix('workloads/')}"))
    for key, lost in sorted(losers.items()):
        record = out.records[key]
        assert isinstance(record, Workload)
        left = tuple(ip for ip in record.ips if ip not in lost)
        if left:
            out.records[key] = replace(record, ips=left)
            continue
        del out.records[key]
        out.skipped[IP_CONFLICT] += 1
        out.skip_details[key] = (f"{IP_CONFLICT}: {', '.join(sorted(lost))} also listed "
                                 "by a newer pod (or one as old)")


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
