"""Seen traffic against policies: what a change would do to flows that ran, which policy
would cover them, and whether what must be encrypted was (issue #19, docs/flows.md).

Rules of this module:
- Pure: reports, inventory and `now` come in, values go out; no clock, no I/O.
- Selection is never recomputed here: every "would this pair be selected" is a pair of
  `diff_selection` (tfcrypt/core/explain.py), the code `tfcrypt policy plan` uses, with
  infrastructure screened out the same way. A pair is unordered, lower address first.
- A record is kept only if its local end (src, else dst) is an address of a workload the
  inventory places on the reporting node (`local_flows`): a node reports only its own
  flows, and cannot make another node's traffic appear. The others are counted.
- Readiness of a node for a flow about to be encrypted, all three needed: a verified
  usable key (what `policy plan` calls verified_key), its own report fresh (generated
  within `Readiness.report_max_age`), and a recent handshake with the flow's other node
  (`Readiness.handshake_max_age`, 180 s as tfcrypt/status_view.py's "recent", in either
  node's report). A flow that would become encrypted while a node it needs is not ready
  would be black-holed: the egress guard drops what cannot leave through the tunnel.
- Both nodes report the same packets (one as sent, one as received): a count of a flow
  and verdict is the largest count any reporter gives for it, never the sum.
- Suggestions and proof reports live in seen_suggest.py and seen_proof.py; what they
  share (flow grouping, counts, pair names) is here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tfcrypt.core.compute import usable_records
from tfcrypt.core.explain import Inventory, PlanDiff, diff_selection
from tfcrypt.model.flow import FlowRecord, FlowReport, Verdict
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Mode
from tfcrypt.model.workload import Workload, ip_sort_key

REPORT_MAX_AGE_S = 120.0  # reports are published every ~30 s: four missed ones
HANDSHAKE_MAX_AGE_S = 180.0  # tfcrypt/status_view.py RECENT_HANDSHAKE_S (WireGuard's
                             # REJECT_AFTER_TIME); keepalives every 25 s keep it younger
Pair = tuple[str, str]


@dataclass(frozen=True)
class Readiness:
    """When a node counts as ready (module rules)."""

    report_max_age: float = REPORT_MAX_AGE_S
    handshake_max_age: float = HANDSHAKE_MAX_AGE_S


DEFAULT_READINESS = Readiness()


@dataclass(frozen=True)
class SeenFlow:
    """One record of `node`'s report, with its ends told apart: `local` is the address of
    a workload on `node`, `remote` the other end."""

    node: str
    record: FlowRecord
    local: str
    remote: str

    @property
    def pair(self) -> Pair:
        return unordered(self.local, self.remote)


@dataclass(frozen=True)
class Seen:
    """The accepted reports by node, their records that passed `local_flows`, and how many
    did not (`not_local`)."""

    reports: Mapping[str, FlowReport]
    flows: tuple[SeenFlow, ...]
    not_local: int = 0

    def since(self, t: float | None) -> Seen:
        """Only the records last seen at or after `t` (None: all)."""
        if t is None:
            return self
        return dataclasses.replace(
            self, flows=tuple(f for f in self.flows if f.record.last_seen >= t))


def local_flows(reports: Mapping[str, FlowReport], workloads: Mapping[str, Workload]) -> Seen:
    """Each report's records whose src or dst is an address of a workload the inventory
    places on the reporting node; the others are counted in `not_local`."""
    local_ips: dict[str, set[str]] = defaultdict(set)
    for w in workloads.values():
        local_ips[w.node].update(w.ips)
    kept: list[SeenFlow] = []
    dropped = 0
    for node, report in sorted(reports.items()):
        mine = local_ips.get(node, set())
        for rec in report.flows:
            if rec.key.src in mine:
                kept.append(SeenFlow(node, rec, rec.key.src, rec.key.dst))
            elif rec.key.dst in mine:
                kept.append(SeenFlow(node, rec, rec.key.dst, rec.key.src))
            else:
                dropped += 1
    return Seen(dict(reports), tuple(kept), dropped)


def unordered(x: str, y: str) -> Pair:
    return (x, y) if ip_sort_key(x) <= ip_sort_key(y) else (y, x)


FlowId = tuple[str, str, str, int | None]  # src, dst, proto, dport: as the packets went


def flow_id(f: SeenFlow) -> FlowId:
    k = f.record.key
    return (k.src, k.dst, k.proto, k.dport)


def flow_text(fid: FlowId) -> str:
    src, dst, proto, dport = fid
    fmt = (lambda ip: f"[{ip}]") if ":" in src else (lambda ip: ip)
    service = proto if dport is None else f"{proto}/{dport}"
    return f"{fmt(src)} -> {fmt(dst)} {service}"


def flow_sort_key(fid: FlowId) -> tuple[Any, ...]:
    src, dst, proto, dport = fid
    return (ip_sort_key(src), ip_sort_key(dst), proto, -1 if dport is None else dport)


@dataclass(frozen=True)
class Counts:
    """Packets and bytes of one flow (or a sum of flows), and when it was last seen."""

    packets: int = 0
    bytes: int = 0
    last_seen: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.packets + other.packets, self.bytes + other.bytes,
                      max(self.last_seen, other.last_seen))

    def to_json(self) -> dict[str, Any]:
        return {"packets": self.packets, "bytes": self.bytes,
                "last_seen": round(self.last_seen, 3)}


def counts_by_verdict(flows: Iterable[SeenFlow]) -> dict[tuple[FlowId, Verdict], Counts]:
    """Per (flow, verdict): the largest count a single reporter gives (module rules)."""
    per_reporter: dict[tuple[FlowId, Verdict, str], Counts] = defaultdict(Counts)
    for f in flows:
        r = f.record
        per_reporter[(flow_id(f), r.key.verdict, f.node)] += Counts(r.packets, r.bytes,
                                                                     r.last_seen)
    best: dict[tuple[FlowId, Verdict], Counts] = {}
    last: dict[tuple[FlowId, Verdict], float] = defaultdict(float)
    for (fid, verdict, _), c in per_reporter.items():
        k = (fid, verdict)
        last[k] = max(last[k], c.last_seen)
        if k not in best or (c.packets, c.bytes) > (best[k].packets, best[k].bytes):
            best[k] = c
    return {k: dataclasses.replace(c, last_seen=last[k]) for k, c in best.items()}


def per_flow(counts: Mapping[tuple[FlowId, Verdict], Counts]) -> dict[FlowId, Counts]:
    """`counts_by_verdict` summed over the verdicts of each flow."""
    out: dict[FlowId, Counts] = defaultdict(Counts)
    for (fid, _), c in counts.items():
        out[fid] += c
    return out


def nodes_of(workloads: Mapping[str, Workload]) -> dict[str, frozenset[str]]:
    """IP -> the nodes of the workloads claiming it."""
    out: dict[str, set[str]] = defaultdict(set)
    for w in workloads.values():
        for ip in w.ips:
            out[ip].add(w.node)
    return {ip: frozenset(n) for ip, n in out.items()}


def handshake_between(reports: Mapping[str, FlowReport], a: str, b: str) -> float | None:
    """The latest handshake between nodes a and b in either one's report (None: never)."""
    times = [t for x, y in ((a, b), (b, a)) if x in reports
             and (t := reports[x].handshakes.get(y)) is not None]
    return max(times) if times else None


def node_problems(node: str, reports: Mapping[str, FlowReport], usable: Collection[str],
                  now: float, readiness: Readiness) -> list[str]:
    """Why `node` is not ready on its own (key, report); empty when it is."""
    problems = []
    if node not in usable:
        problems.append(f"{node}: no verified usable key (no node record, or one whose key "
                        "another record shares)")
    report = reports.get(node)
    if report is None:
        problems.append(f"{node}: no flow report (is its agent running?)")
    elif (age := now - report.generated_at) > readiness.report_max_age:
        problems.append(f"{node}: its report is {age:.0f} s old (fresh: within "
                        f"{readiness.report_max_age:.0f} s; is its agent running?)")
    return problems


def pair_problem(a: str, b: str, reports: Mapping[str, FlowReport], now: float,
                 readiness: Readiness) -> str | None:
    """Why nodes a and b have no recent handshake, or None."""
    at = handshake_between(reports, a, b)
    if at is not None and now - at <= readiness.handshake_max_age:
        return None
    last = "never" if at is None else f"last {now - at:.0f} s ago"
    return (f"{a} <-> {b}: no handshake within {readiness.handshake_max_age:.0f} s "
            f"({last})")


class Change(enum.Enum):
    ENCRYPT = "encrypt"  # the pair becomes selected: into the tunnel
    LEAVE = "leave"      # the pair stops being selected: out of the tunnel


@dataclass(frozen=True)
class PlanFlow:
    """One seen flow (as its packets went) that a policy change moves."""

    flow: FlowId
    change: Change
    nodes: tuple[str, ...]          # the nodes at its two ends
    reporters: tuple[str, ...]
    verdicts: tuple[str, ...]       # the verdicts it was seen with
    counts: Counts
    problems: tuple[str, ...]       # readiness problems of its nodes (ENCRYPT only)

    @property
    def black_holed(self) -> bool:
        return self.change is Change.ENCRYPT and bool(self.problems)

    def to_json(self) -> dict[str, Any]:
        src, dst, proto, dport = self.flow
        return {"src": src, "dst": dst, "proto": proto, "dport": dport,
                "change": self.change.value, "nodes": list(self.nodes),
                "reporters": list(self.reporters), "verdicts": list(self.verdicts),
                **self.counts.to_json(), "ready": not self.problems,
                "black_holed": self.black_holed, "problems": list(self.problems)}


@dataclass(frozen=True)
class SeenPlan:
    policy: str
    as_if_enforced: bool
    diff: PlanDiff
    flows: tuple[PlanFlow, ...]
    considered: int                  # seen records looked at (after `since`)
    nodes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # node -> problems

    @property
    def black_holed(self) -> tuple[PlanFlow, ...]:
        return tuple(f for f in self.flows if f.black_holed)

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "as_if_enforced": self.as_if_enforced,
                "considered_records": self.considered,
                "flows": [f.to_json() for f in self.flows],
                "black_holed": len(self.black_holed),
                "nodes": {n: list(p) for n, p in sorted(self.nodes.items())}}


def enforced_diff(inventory: Inventory, policy: EncryptionPolicy,
                  infrastructure: Mapping[str, str] | None = None) -> PlanDiff:
    """What enforcing `policy` (replacing any policy of its name) changes: `policy plan`."""
    policies = dict(inventory.policies)
    enforced = dataclasses.replace(policy, mode=Mode.ENFORCE)
    return diff_selection(policies, {**policies, policy.name: enforced}, inventory.workloads,
                          inventory.nodes, infrastructure)


def plan_against_seen(inventory: Inventory, policy: EncryptionPolicy, seen: Seen, *,
                      now: float, since: float | None = None,
                      infrastructure: Mapping[str, str] | None = None,
                      readiness: Readiness = DEFAULT_READINESS,
                      diff: PlanDiff | None = None) -> SeenPlan:
    """The seen flows (last seen at or after `since`) whose pair enforcing `policy` would
    newly select or unselect, each with its nodes' readiness; `diff`: the change, when the
    caller computed it already (`enforced_diff` of the same arguments)."""
    if diff is None:
        diff = enforced_diff(inventory, policy, infrastructure)
    seen = seen.since(since)
    changes = {**{p: Change.ENCRYPT for p in diff.added},
               **{p: Change.LEAVE for p in diff.removed}}
    ip_nodes = nodes_of(inventory.workloads)
    usable = usable_nodes(inventory.nodes)
    moved: dict[FlowId, list[SeenFlow]] = defaultdict(list)
    for f in seen.flows:
        if f.pair in changes:
            moved[flow_id(f)].append(f)
    totals = per_flow(counts_by_verdict(f for fs in moved.values() for f in fs))
    node_notes: dict[str, tuple[str, ...]] = {}
    out = []
    for fid, fs in sorted(moved.items(), key=lambda kv: flow_sort_key(kv[0])):
        change = changes[fs[0].pair]
        links = sorted({tuple(sorted((f.node, n))) for f in fs
                        for n in ip_nodes.get(f.remote, ()) if n != f.node})
        ends = sorted({n for link in links for n in link} | {f.node for f in fs})
        problems: list[str] = []
        if change is Change.ENCRYPT:
            for n in ends:
                if n not in node_notes:
                    node_notes[n] = tuple(node_problems(n, seen.reports, usable, now,
                                                        readiness))
                problems += node_notes[n]
            problems += [why for a, b in links
                         if (why := pair_problem(a, b, seen.reports, now, readiness))]
        out.append(PlanFlow(fid, change, tuple(ends), tuple(sorted({f.node for f in fs})),
                            tuple(sorted({f.record.key.verdict.value for f in fs})), totals[fid],
                            tuple(problems)))
    return SeenPlan(policy.name, not policy.enforced, diff, tuple(out), len(seen.flows),
                    node_notes)


def usable_nodes(nodes: Mapping[str, NodeRecord]) -> set[str]:
    """Nodes with a verified record whose key no other record shares (explain's rule)."""
    return set(usable_records(nodes, "", "")[0])


def pair_text(pair: Pair) -> str:
    return " <-> ".join(f"[{ip}]" if ":" in ip else ip for ip in pair)
