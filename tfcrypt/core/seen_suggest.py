"""A policy suggested from seen traffic: encrypt every seen flow touching a tag set.

Rules of this module (docs/flows.md, "tfcrypt policy suggest"):
- Pure, like tfcrypt/core/seen.py, whose values it reads.
- A seen flow touches the tag set when a workload at one of its ends (the local end: on
  the reporting node; the remote end: on another node) carries every tag of the set.
- One rule per distinct peer: endpoint1 {tags: the touching tags}, endpoint2 {tags: the
  peer's full effective tag set}, so the policy selects, as far as tags can tell, the
  seen peers and nothing else; a peer without tags gets `subnet: <ip>/32` (/128). No
  match_tags: what the flows showed is who talked, not which values they shared.
- The suggestion is in audit mode: applying and enforcing it is the operator's step.
- It is then checked with the selection code itself (`diff_selection` of the
  suggestion alone, as if enforced): the covered seen flows, the touching flows it cannot
  cover and why (an unknown peer address, the same node, an infrastructure address),
  and the pairs it selects that no seen flow used (the blast radius).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from tfcrypt.core.compute import host_cidr
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
    per_flow,
)
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule, is_policy_name
from tfcrypt.model.tags import Tag, sorted_tag_texts
from tfcrypt.model.workload import Workload, ip_sort_key

DEFAULT_NAME = "suggested"


@dataclass(frozen=True)
class CoveredFlow:
    """A seen flow the suggestion selects, and the rule (index) that selects it."""

    flow: FlowId
    rules: tuple[int, ...]
    counts: Counts

    def to_json(self) -> dict[str, Any]:
        src, dst, proto, dport = self.flow
        return {"src": src, "dst": dst, "proto": proto, "dport": dport,
                "rules": list(self.rules), **self.counts.to_json()}


@dataclass(frozen=True)
class Suggestion:
    touching: frozenset[Tag]
    policy: EncryptionPolicy | None            # None: no seen flow touches the tags
    covered: tuple[CoveredFlow, ...]
    uncovered: tuple[tuple[FlowId, str], ...]  # touching flows it cannot select, and why
    unseen_pairs: tuple[Pair, ...]             # selected, but no seen flow used them

    def yaml(self) -> str:
        """The policy as a file `tfcrypt policy apply -f` takes (audit mode)."""
        assert self.policy is not None
        head = (f"# suggested by `tfcrypt policy suggest` from {len(self.covered)} seen "
                f"flow(s) touching {', '.join(sorted_tag_texts(self.touching))}; audit mode:\n"
                "# review it, `tfcrypt policy plan -f FILE --against-seen`, apply, then set "
                "mode: enforce\n")
        return head + yaml.safe_dump(self.policy.to_document(), sort_keys=False,
                                     default_flow_style=False, allow_unicode=True)

    def to_json(self) -> dict[str, Any]:
        return {"touching": sorted_tag_texts(self.touching),
                "policy": self.policy.to_document() if self.policy else None,
                "covered": [c.to_json() for c in self.covered],
                "uncovered": [{"src": f[0], "dst": f[1], "proto": f[2], "dport": f[3],
                               "reason": why} for f, why in self.uncovered],
                "unseen_pairs": [list(p) for p in self.unseen_pairs]}


def default_name(touching: frozenset[Tag]) -> str:
    """`seen-label-pci` for {label=pci}; DEFAULT_NAME when the tags make no valid name."""
    text = "seen-" + "-".join(re.sub(r"[^a-z0-9]+", "-", str(t).lower()).strip("-")
                              for t in sorted(touching))
    text = text[:253].strip("-.")
    return text if is_policy_name(text) else DEFAULT_NAME


def _peer_endpoint(w: Workload, ip: str) -> Endpoint:
    return Endpoint(tags=w.tags) if w.tags else Endpoint(subnet=host_cidr(ip))


def _endpoint_order(e: Endpoint) -> tuple[Any, ...]:
    if e.tags is not None:
        return (0, sorted_tag_texts(e.tags))
    assert e.subnet is not None
    return (1, ip_sort_key(e.subnet.partition("/")[0]))


def suggest(inventory: Inventory, seen: Seen, touching: frozenset[Tag], *,
            name: str | None = None,
            infrastructure: Mapping[str, str] | None = None) -> Suggestion:
    """The audit-mode policy selecting every seen flow touching `touching` (module rules)."""
    by_ip: dict[str, list[Workload]] = defaultdict(list)
    for w in sorted(inventory.workloads.values(), key=lambda w: w.key):
        for ip in w.ips:
            by_ip[ip].append(w)
    touching_flows: dict[FlowId, list[SeenFlow]] = defaultdict(list)
    peers: dict[FlowId, set[Endpoint]] = defaultdict(set)
    uncovered: dict[FlowId, str] = {}
    for f in seen.flows:
        here = [w for w in by_ip[f.local] if w.node == f.node]
        there = [w for w in by_ip.get(f.remote, ()) if w.node != f.node]
        fid = flow_id(f)
        near, far = any(touching <= w.tags for w in here), any(touching <= w.tags
                                                               for w in there)
        if not (near or far):
            if any(touching <= w.tags for w in by_ip.get(f.remote, ())):
                uncovered[fid] = "both ends on the same node: it never leaves it"
            continue
        touching_flows[fid].append(f)
        if near and not there:
            same = any(w.node == f.node for w in by_ip.get(f.remote, ()))
            uncovered[fid] = ("both ends on the same node: it never leaves it" if same
                              else f"no workload has {f.remote}: tfcrypt selects only "
                                   "workloads' addresses")
            continue
        if near:
            peers[fid] |= {_peer_endpoint(w, f.remote) for w in there}
        if far:
            peers[fid] |= {_peer_endpoint(w, f.local) for w in here}
    ends = sorted({e for es in peers.values() for e in es}, key=_endpoint_order)
    if not ends:
        return Suggestion(touching, None, (), tuple(sorted(
            uncovered.items(), key=lambda kv: flow_sort_key(kv[0]))), ())
    policy = EncryptionPolicy(name or default_name(touching), Mode.AUDIT,
                              tuple(Rule(Endpoint(tags=touching), e) for e in ends))
    diff = diff_selection({}, {policy.name: dataclasses.replace(policy, mode=Mode.ENFORCE)},
                          inventory.workloads, inventory.nodes, infrastructure)
    totals = per_flow(counts_by_verdict(f for fs in touching_flows.values() for f in fs))
    rule_of = {e: i for i, e in enumerate(ends)}
    covered = []
    for fid, fs in sorted(touching_flows.items(), key=lambda kv: flow_sort_key(kv[0])):
        if fid in uncovered:
            continue
        if fs[0].pair in diff.added:
            covered.append(CoveredFlow(fid, tuple(sorted(rule_of[e] for e in peers[fid])),
                                       totals[fid]))
            continue
        refused = [f"{ip} is infrastructure ({diff.refused[ip]})"
                   for ip in (fs[0].local, fs[0].remote) if ip in diff.refused]
        uncovered[fid] = "; ".join(refused) or "not selected by the suggestion"
    seen_pairs = {f.pair for f in seen.flows}
    unseen = sorted(diff.added - seen_pairs, key=lambda p: (ip_sort_key(p[0]),
                                                             ip_sort_key(p[1])))
    return Suggestion(touching, policy, tuple(covered),
                      tuple(sorted(uncovered.items(), key=lambda kv: flow_sort_key(kv[0]))),
                      tuple(unseen))
