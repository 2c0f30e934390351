"""Proof of encryption: per enforced policy, what its selected pairs' traffic did.

Rules of this module (docs/flows.md, "tfcrypt report"):
- Pure, like tfcrypt/core/seen.py, whose values and counting rule (the largest count
  of any reporter, never the sum of both sides) it uses.
- A policy's selected pairs are `diff_selection` of that policy alone (what it selects
  whatever the other policies do), infrastructure screened out as the agents do; only
  enforce-mode policies are proved: an audit policy promises nothing.
- Per policy: the selected pairs that carried traffic; packets and bytes inside
  WireGuard; plaintext packets of selected pairs that strict ingress dropped (someone
  sent them in the clear: a misconfigured or hostile sender, shown as protection that
  worked); egress guard drops (selected traffic that could not leave through the
  tunnel); plaintext of selected pairs that went through (should be none: a bug, an
  attack, or traffic from before the policy was enforced: use `since`), flagged; and
  the last handshake of every node pair involved.
- Each node's report is listed with its age, and the nodes of the inventory (records,
  workloads) without one are named: a reader sees whose traffic is missing.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tfcrypt.core.explain import Inventory, diff_selection
from tfcrypt.core.seen import (
    Counts,
    FlowId,
    Pair,
    Seen,
    SeenFlow,
    counts_by_verdict,
    flow_id,
    flow_sort_key,
    handshake_between,
    nodes_of,
)
from tfcrypt.model.flow import Verdict
from tfcrypt.model.policy import Mode
from tfcrypt.model.workload import ip_sort_key


@dataclass(frozen=True)
class PairProof:
    """One selected pair that carried traffic: its counts per verdict."""

    pair: Pair
    nodes: tuple[str, ...]
    verdicts: Mapping[Verdict, Counts]

    def to_json(self) -> dict[str, Any]:
        return {"pair": list(self.pair), "nodes": list(self.nodes),
                **{v.value: c.to_json() for v, c in self.verdicts.items()}}


@dataclass(frozen=True)
class PolicyProof:
    policy: str
    selected_pairs: int
    pairs: tuple[PairProof, ...]                  # selected pairs with traffic
    totals: Mapping[Verdict, Counts]
    plaintext_flows: tuple[tuple[FlowId, Counts], ...]    # flagged: should be none
    ingress_drop_flows: tuple[tuple[FlowId, Counts], ...]
    handshakes: tuple[tuple[str, str, float | None], ...]  # node pair, last handshake

    def total(self, verdict: Verdict) -> Counts:
        return self.totals.get(verdict, Counts())

    def to_json(self) -> dict[str, Any]:
        def flows(items: tuple[tuple[FlowId, Counts], ...]) -> list[dict[str, Any]]:
            return [{"src": f[0], "dst": f[1], "proto": f[2], "dport": f[3], **c.to_json()}
                    for f, c in items]
        return {"policy": self.policy, "selected_pairs": self.selected_pairs,
                "pairs_with_traffic": len(self.pairs),
                **{v.value: self.total(v).to_json() for v in Verdict},
                "plaintext_flows": flows(self.plaintext_flows),
                "ingress_drop_flows": flows(self.ingress_drop_flows),
                "pairs": [p.to_json() for p in self.pairs],
                "handshakes": [{"nodes": [a, b], "last": t} for a, b, t in self.handshakes]}


@dataclass(frozen=True)
class ReportState:
    """One node's report as the reader saw it."""

    node: str
    generated_at: float
    records: int
    omitted: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProofReport:
    policies: tuple[PolicyProof, ...]
    reports: tuple[ReportState, ...]
    considered: int      # records looked at (after `since`)
    not_local: int
    unreported: tuple[str, ...] = ()  # nodes of the inventory without a believed report

    @property
    def plaintext_found(self) -> bool:
        return any(p.plaintext_flows for p in self.policies)

    def to_json(self) -> dict[str, Any]:
        return {"policies": [p.to_json() for p in self.policies],
                "reports": [r.to_json() for r in self.reports],
                "considered_records": self.considered, "not_local": self.not_local,
                "unreported": list(self.unreported),
                "plaintext_of_selected_pairs": self.plaintext_found}


def proof_report(inventory: Inventory, seen: Seen, *, since: float | None = None,
                 infrastructure: Mapping[str, str] | None = None) -> ProofReport:
    """Per enforced policy of `inventory`, what its selected pairs' seen traffic did."""
    seen = seen.since(since)
    ip_nodes = nodes_of(inventory.workloads)
    by_pair: dict[Pair, list[SeenFlow]] = defaultdict(list)
    for f in seen.flows:
        by_pair[f.pair].append(f)
    proofs = []
    for name, policy in sorted(inventory.policies.items()):
        if policy.mode is not Mode.ENFORCE:
            continue
        selected = diff_selection({}, {name: policy}, inventory.workloads, inventory.nodes,
                                  infrastructure).added
        flows = [f for p in selected & by_pair.keys() for f in by_pair[p]]
        counts = counts_by_verdict(flows)
        pair_verdicts: dict[Pair, dict[Verdict, Counts]] = defaultdict(
            lambda: defaultdict(Counts))
        totals: dict[Verdict, Counts] = defaultdict(Counts)
        pair_of = {flow_id(f): f.pair for f in flows}
        for (fid, verdict), c in counts.items():
            pair_verdicts[pair_of[fid]][verdict] += c
            totals[verdict] += c
        node_pairs: set[tuple[str, str]] = set()
        pairs = []
        for pair in sorted(pair_verdicts, key=lambda p: (ip_sort_key(p[0]),
                                                          ip_sort_key(p[1]))):
            nodes = tuple(sorted(ip_nodes.get(pair[0], frozenset())
                                 | ip_nodes.get(pair[1], frozenset())))
            node_pairs |= {(a, b) for a in ip_nodes.get(pair[0], ())
                           for b in ip_nodes.get(pair[1], ()) if a != b}
            pairs.append(PairProof(pair, nodes, dict(pair_verdicts[pair])))
        ordered = sorted({tuple(sorted(p)) for p in node_pairs})
        proofs.append(PolicyProof(
            name, len(selected), tuple(pairs), dict(totals),
            _flows_of(counts, Verdict.PLAINTEXT), _flows_of(counts, Verdict.INGRESS_DROP),
            tuple((a, b, handshake_between(seen.reports, a, b)) for a, b in ordered)))
    states = tuple(ReportState(r.node, r.generated_at, len(r.flows), r.omitted)
                   for _, r in sorted(seen.reports.items()))
    known = set(inventory.nodes) | {w.node for w in inventory.workloads.values()}
    return ProofReport(tuple(proofs), states, len(seen.flows), seen.not_local,
                       tuple(sorted(known - set(seen.reports))))


def _flows_of(counts: Mapping[tuple[FlowId, Verdict], Counts], verdict: Verdict
              ) -> tuple[tuple[FlowId, Counts], ...]:
    return tuple(sorted(((fid, c) for (fid, v), c in counts.items() if v is verdict),
                        key=lambda item: flow_sort_key(item[0])))
