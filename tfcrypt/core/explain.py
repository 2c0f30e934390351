"""Why a flow is (not) encrypted, and what a policy change would change: for operators.

Rules:
- Global view: every workload, every policy, and which nodes have a usable verified key
  (a record whose public key no other record shares). No own node: the answer is the same
  whichever agent or CLI asks.
- `explain` agrees with `is_selected_pairwise` by construction (it evaluates the same
  predicates), and says for every enforce rule which selector failed on which side, in
  both orientations, in words an operator can act on:
  "src 10.200.1.11 (n1-w1) lacks tag application=payments",
  "match_tags site: n1-w1 has site=a, n2-w1 has site=b", "same node", "unknown IP".
- An address that is infrastructure (tfcrypt/core/infrastructure.py: a node record's
  address, an etcd endpoint, a prefix the caller passes) is refused for selection: the
  flow is not selected whatever the rules say, and the note says why; `diff_selection`
  screens the workloads the same way and lists the refused addresses.
- A selected flow whose nodes lack a usable key is reported as dropped: tfcrypt never
  sends a selected flow in plaintext.
- `diff_selection` computes the pairs a policy change adds and removes, over all nodes
  (a pair still selected through another claimant of a conflicting IP is not removed),
  and per node the (local, remote) pairs each node gains and loses. It
  materialises pairs and classifies once per node: meant for `policy plan`, not for the
  agent loop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tfcrypt.core.compute import usable_records
from tfcrypt.core.infrastructure import infrastructure_of, screened
from tfcrypt.core.remote_index import RemoteIndex
from tfcrypt.core.selection import (
    RuleRef,
    classify,
    endpoint_matches,
    rules_of,
)
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode
from tfcrypt.model.workload import Workload, ip_sort_key

_NO_NODE = ""


class Inventory(Protocol):
    """What explain reads; a compute.Snapshot is one."""

    @property
    def workloads(self) -> Mapping[str, Workload]: ...
    @property
    def policies(self) -> Mapping[str, EncryptionPolicy]: ...
    @property
    def nodes(self) -> Mapping[str, NodeRecord]: ...


@dataclass(frozen=True)
class GlobalView:
    """An Inventory as a value: what the controller CLI and the demo hand to explain."""

    workloads: Mapping[str, Workload]
    policies: Mapping[str, EncryptionPolicy]
    nodes: Mapping[str, NodeRecord]


@dataclass(frozen=True)
class RuleVerdict:
    """One rule judged on one (src workload, dst workload) combination."""

    policy: str
    rule: int
    mode: Mode
    src_workload: str
    dst_workload: str
    orientations: tuple[str, ...]  # the ways round it matches; empty if it does not
    reasons: tuple[str, ...]       # why it does not match; empty if it does

    @property
    def matched(self) -> bool:
        return bool(self.orientations)

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "rule": self.rule, "mode": self.mode.value,
                "src_workload": self.src_workload, "dst_workload": self.dst_workload,
                "matched": self.matched, "orientations": list(self.orientations),
                "reasons": list(self.reasons)}


@dataclass(frozen=True)
class Explanation:
    src_ip: str
    dst_ip: str
    src_workloads: tuple[str, ...]   # "name@node"
    dst_workloads: tuple[str, ...]
    selected: bool
    notes: tuple[str, ...]           # unknown IP, same node
    verdicts: tuple[RuleVerdict, ...]  # every enforce rule, per workload combination
    audit_matches: tuple[RuleVerdict, ...]
    missing_keys: tuple[str, ...]    # nodes of the flow without a usable verified key
    refused: tuple[tuple[str, str], ...] = ()  # (ip, reason): infrastructure, never selected

    @property
    def matches(self) -> tuple[RuleVerdict, ...]:
        return tuple(v for v in self.verdicts if v.matched)

    @property
    def dropped(self) -> bool:
        """Selected, but a node of the flow has no usable key: the dataplane drops it."""
        return self.selected and bool(self.missing_keys)

    def render(self) -> str:
        src = f"{self.src_ip} ({', '.join(self.src_workloads) or 'unknown'})"
        dst = f"{self.dst_ip} ({', '.join(self.dst_workloads) or 'unknown'})"
        lines = [f"{src} -> {dst}: {'selected' if self.selected else 'not selected'}"]
        lines += [f"  {note}" for note in self.notes]
        several = len(self.src_workloads) * len(self.dst_workloads) > 1
        for v in self.verdicts:
            head = f"  {v.policy} rule {v.rule}"
            if several:
                head += f" [{v.src_workload} -> {v.dst_workload}]"
            if v.matched:
                lines.append(f"{head}: selects ({'; '.join(v.orientations)})")
            else:
                lines += [f"{head}: {reason}" for reason in v.reasons]
        for v in self.audit_matches:
            lines.append(f"  audit: {v.policy} rule {v.rule} would select "
                         f"({'; '.join(v.orientations)})")
        for node in self.missing_keys:
            if self.selected:
                lines.append(f"  missing peer key for {node}: traffic is dropped")
            else:
                lines.append(f"  no verified peer key for {node}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"src_ip": self.src_ip, "dst_ip": self.dst_ip,
                "src_workloads": list(self.src_workloads),
                "dst_workloads": list(self.dst_workloads),
                "selected": self.selected, "dropped": self.dropped, "notes": list(self.notes),
                "rules": [v.to_json() for v in self.verdicts],
                "audit_matches": [v.to_json() for v in self.audit_matches],
                "missing_keys": list(self.missing_keys),
                "refused": dict(self.refused)}


def explain(inventory: Inventory, src_ip: str, dst_ip: str,
            infrastructure: Mapping[str, str] | None = None) -> Explanation:
    """Why the flow src_ip -> dst_ip is or is not selected, rule by rule; `infrastructure`
    (prefix -> reason) is added to the node records' addresses."""
    src_ip, dst_ip = _normal(src_ip), _normal(dst_ip)
    workloads = sorted(inventory.workloads.values(), key=lambda w: w.key)
    srcs = [w for w in workloads if src_ip in w.ips]
    dsts = [w for w in workloads if dst_ip in w.ips]
    notes = [f"unknown IP {ip}: no workload has it"
             for ip, found in ((src_ip, srcs), (dst_ip, dsts)) if not found]
    infra = infrastructure_of(infrastructure or {}, inventory.nodes)
    refused = tuple((ip, why) for ip in dict.fromkeys((src_ip, dst_ip))
                    if (why := infra.reason_for(ip)) is not None)
    notes += [f"{ip} is infrastructure ({why}): refused for selection, never encrypted "
              "(traffic to and from it is never classified)" for ip, why in refused]
    if refused:
        return Explanation(src_ip, dst_ip, tuple(_label(w) for w in srcs),
                           tuple(_label(w) for w in dsts), False, tuple(notes), (), (), (),
                           refused)
    enforce = rules_of(inventory.policies.values(), Mode.ENFORCE)
    audit = rules_of(inventory.policies.values(), Mode.AUDIT)
    verdicts: list[RuleVerdict] = []
    audit_matches: list[RuleVerdict] = []
    flow_nodes: set[str] = set()
    audit_nodes: set[str] = set()
    for a in srcs:
        for b in dsts:
            if a.node == b.node:
                notes.append(f"same node {a.node}: {_name(a)} and {_name(b)} never leave it")
                continue
            for ref in enforce:
                verdict = judge(ref, Mode.ENFORCE, a, src_ip, b, dst_ip)
                verdicts.append(verdict)
                if verdict.matched:
                    flow_nodes |= {a.node, b.node}
            for ref in audit:
                verdict = judge(ref, Mode.AUDIT, a, src_ip, b, dst_ip)
                if verdict.matched:
                    audit_matches.append(verdict)
                    audit_nodes |= {a.node, b.node}
    usable = _usable(inventory.nodes)
    selected = any(v.matched for v in verdicts)
    needed = flow_nodes if selected else audit_nodes
    return Explanation(
        src_ip, dst_ip, tuple(_label(w) for w in srcs), tuple(_label(w) for w in dsts),
        selected, tuple(notes), tuple(verdicts), tuple(audit_matches),
        tuple(sorted(n for n in needed if n not in usable)))


def judge(ref: RuleRef, mode: Mode, a: Workload, x: str, b: Workload, y: str) -> RuleVerdict:
    """The rule's verdict on (a,x) -> (b,y); same-node is the caller's business."""
    rule = ref.rule
    mismatched = [r for r in (_match_tag_reason(t, a, b) for t in rule.match_tags) if r]
    ways = (("src in endpoint1, dst in endpoint2", rule.endpoint1, rule.endpoint2),
            ("src in endpoint2, dst in endpoint1", rule.endpoint2, rule.endpoint1))
    orientations: list[str] = []
    failures: list[str] = []
    for way, src_end, dst_end in ways:
        failed = [r for r in (_endpoint_reason("src", src_end, a, x),
                              _endpoint_reason("dst", dst_end, b, y)) if r]
        failures += [f"as {way}: {r}" for r in failed]
        if not failed:
            orientations.append(way)
    if mismatched:
        orientations, reasons = [], mismatched + failures
    else:
        reasons = [] if orientations else failures
    return RuleVerdict(ref.policy, ref.index, mode, _label(a), _label(b), tuple(orientations),
                       tuple(_dedupe(reasons)))


def _endpoint_reason(role: str, endpoint: Endpoint, w: Workload, ip: str) -> str | None:
    if endpoint_matches(endpoint, w, ip):
        return None
    who = f"{role} {ip} ({_name(w)})"
    if endpoint.tags is not None:
        lacking = sorted(str(t) for t in endpoint.tags - w.tags)
        return f"{who} lacks tag{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}"
    return f"{who} is not in subnet {endpoint.subnet}"


def _match_tag_reason(tag_type: str, a: Workload, b: Workload) -> str | None:
    va, vb = a.tag_value(tag_type), b.tag_value(tag_type)
    if va is not None and va == vb:
        return None
    shown = [f"{_name(w)} has {tag_type}={v}" if v is not None else f"{_name(w)} lacks {tag_type}"
             for w, v in ((a, va), (b, vb))]
    return f"match_tags {tag_type}: {', '.join(shown)}"


@dataclass(frozen=True)
class NodePlan:
    """Pairs with a local side on `node` that a policy change adds and removes."""

    node: str
    added: int
    removed: int


@dataclass(frozen=True)
class PlanDiff:
    added: frozenset[tuple[str, str]]    # unordered pairs, lower IP first
    removed: frozenset[tuple[str, str]]
    per_node: Mapping[str, NodePlan]     # nodes with a change only
    missing_peers: frozenset[str]        # nodes the new selection needs without a usable key
    refused: Mapping[str, str] = field(default_factory=dict)  # infrastructure ip -> reason

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    def render(self) -> str:
        lines = [f"{len(self.added)} pairs newly encrypted, {len(self.removed)} no longer"]
        lines += [f"  + {x} <-> {y}" for x, y in _ordered(self.added)]
        lines += [f"  - {x} <-> {y}" for x, y in _ordered(self.removed)]
        lines += [f"  node {p.node}: +{p.added} -{p.removed}" for p in self.per_node.values()]
        lines += [f"  missing peer key for {n}: its selected traffic would be dropped"
                  for n in sorted(self.missing_peers)]
        if self.refused:
            shown = list(self.refused.items())[:20]
            more = len(self.refused) - len(shown)
            lines.append(f"  {len(self.refused)} workload address(es) refused as "
                         "infrastructure, never selected: "
                         + ", ".join(f"{ip} ({why})" for ip, why in shown)
                         + (f" and {more} more" if more else ""))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"added": [list(p) for p in _ordered(self.added)],
                "removed": [list(p) for p in _ordered(self.removed)],
                "per_node": {n: {"added": p.added, "removed": p.removed}
                             for n, p in self.per_node.items()},
                "missing_peers": sorted(self.missing_peers),
                "refused": dict(self.refused)}


def diff_selection(before_policies: Mapping[str, EncryptionPolicy],
                   after_policies: Mapping[str, EncryptionPolicy],
                   workloads: Mapping[str, Workload],
                   nodes: Mapping[str, NodeRecord],
                   infrastructure: Mapping[str, str] | None = None) -> PlanDiff:
    """What replacing `before_policies` by `after_policies` changes in enforced selection
    (infrastructure addresses screened out first, as the agents do)."""
    workloads, refused = screened(workloads, infrastructure_of(infrastructure or {}, nodes))
    all_workloads = tuple(workloads.values())
    before_rules = rules_of(before_policies.values(), Mode.ENFORCE)
    after_rules = rules_of(after_policies.values(), Mode.ENFORCE)
    before_all: set[tuple[str, str]] = set()
    after_all: set[tuple[str, str]] = set()
    per_node: dict[str, NodePlan] = {}
    needed: set[str] = set()
    node_of_ip: dict[str, set[str]] = {}
    for w in all_workloads:
        for ip in w.ips:
            node_of_ip.setdefault(ip, set()).add(w.node)
    for node in sorted({w.node for w in all_workloads}):
        index = RemoteIndex(node, all_workloads)
        before = classify(node, all_workloads, before_rules, index).pairs()
        after = classify(node, all_workloads, after_rules, index).pairs()
        plus, minus = after - before, before - after
        if plus or minus:
            per_node[node] = NodePlan(node, len(plus), len(minus))
        before_all |= {_unordered(p) for p in before}
        after_all |= {_unordered(p) for p in after}
        if after:
            needed.add(node)
            needed |= {n for _, y in after for n in node_of_ip[y] if n != node}
    added, removed = after_all - before_all, before_all - after_all
    usable = _usable(nodes)
    return PlanDiff(frozenset(added), frozenset(removed), per_node,
                    frozenset(n for n in needed if n not in usable), refused)


def _usable(nodes: Mapping[str, NodeRecord]) -> set[str]:
    """Nodes whose record can make a peer for everyone: no other record shares its key."""
    usable, _ = usable_records(nodes, _NO_NODE, _NO_NODE)
    return set(usable)


def _normal(ip: str) -> str:
    """The normal form workloads use; ValueError names a text that is no address."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"{ip!r} is not an IP address") from None


def _unordered(pair: tuple[str, str]) -> tuple[str, str]:
    x, y = pair
    return (x, y) if ip_sort_key(x) <= ip_sort_key(y) else (y, x)


def _ordered(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(pairs, key=lambda p: (ip_sort_key(p[0]), ip_sort_key(p[1])))


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _name(w: Workload) -> str:
    return w.name


def _label(w: Workload) -> str:
    return f"{w.name}@{w.node}"
