"""The status an EncryptionPolicy object gets back: pure functions, no I/O.

Rules (docs/controller.md, "Status"):
- observedGeneration is the generation the status describes; a status from an older
  generation is never left looking current.
- Accepted: True when the CLI's parser accepts the object (it is then published at
  `policies/<name>`); False with reason Refused and the parser's message, which names
  the field ("EncryptionPolicy x: spec.rules[0].endpoint1: exactly one of tags, subnet,
  any"): nothing is published for it.
- Ready: True when every node the policy's selection needs has a verified key (else the
  agents drop the selected traffic: tfcrypt never sends it in plaintext); False names
  the nodes. In audit mode Ready says whether enforcing it would be ready.
- pairs / nodes: workload pairs the policy selects on its own (as if enforced, the
  agents' screening of infrastructure addresses applied) and the nodes carrying them; in
  audit mode wouldAdd / wouldRemove: what enforcing it would change beside the other
  enforced policies.
- A condition's lastTransitionTime changes only when its status does, so a resync
  writes the same status and the API server sees no change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tfcrypt.core.explain import diff_selection
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Mode
from tfcrypt.model.workload import Workload


def _condition(kind: str, ok: bool, reason: str, message: str, now: str,
               previous: Mapping[str, Any] | None) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = (previous.get("lastTransitionTime") if previous is not None
             and previous.get("status") == status else None) or now
    return {"type": kind, "status": status, "reason": reason, "message": message[:1024],
            "lastTransitionTime": since}


def _previous(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conds = ((obj.get("status") or {}).get("conditions")) or []
    return {c.get("type", ""): c for c in conds if isinstance(c, dict)}


def refused_status(obj: Mapping[str, Any], error: str, now: str) -> dict[str, Any]:
    """The status of an object the parser refuses."""
    prev = _previous(obj)
    generation = (obj.get("metadata") or {}).get("generation")
    return {"observedGeneration": generation, "pairs": 0, "nodes": 0,
            "conditions": [
                _condition("Accepted", False, "Refused", error, now, prev.get("Accepted")),
                _condition("Ready", False, "NotAccepted", "not published: " + error, now,
                           prev.get("Ready"))]}


def accepted_status(obj: Mapping[str, Any], policy: EncryptionPolicy,
                    workloads: Mapping[str, Workload],
                    policies: Mapping[str, EncryptionPolicy],
                    nodes: Mapping[str, NodeRecord], now: str,
                    infrastructure: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The status of a published policy, against the inventory in etcd (`policies` by
    name: every published policy, this one included or not)."""
    prev = _previous(obj)
    generation = (obj.get("metadata") or {}).get("generation")
    enforced = dataclasses.replace(policy, mode=Mode.ENFORCE)
    alone = diff_selection({}, {policy.name: enforced}, workloads, nodes, infrastructure)
    missing = sorted(alone.missing_peers)
    ready_msg = ("every node the selection needs has a verified key" if not missing else
                 "no verified key for node(s) " + ", ".join(missing)
                 + ": their selected traffic is dropped")
    if not policy.enforced:
        ready_msg = "(audit mode, as if enforced) " + ready_msg
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "mode": policy.mode.value,
        "pairs": len(alone.added),
        "nodes": len(alone.per_node),
        "conditions": [
            _condition("Accepted", True, "Published",
                       f"published at policies/{policy.name}", now, prev.get("Accepted")),
            _condition("Ready", not missing, "KeysVerified" if not missing else "MissingKeys",
                       ready_msg, now, prev.get("Ready"))]}
    if not policy.enforced:
        others = {n: p for n, p in policies.items() if n != policy.name}
        change = diff_selection(others, {**others, policy.name: enforced}, workloads, nodes,
                                infrastructure)
        status["wouldAdd"] = len(change.added)
        status["wouldRemove"] = len(change.removed)
    return status


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Whether writing `b` over `a` would change anything a user sees."""
    return a is not None and dict(a) == dict(b)
