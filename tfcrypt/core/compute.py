"""compute(Snapshot) -> Desired: one node's tag-selective encryption state, as data.

Rules (DESIGN.md, "Policy model" and "Dataplane"; docs/policy.md):
- Pure: the Snapshot holds verified, fresh inputs (the agent drops stale records before);
  nothing here reads a clock or does I/O. Same Snapshot content, same Desired (`==`),
  whatever order the mappings were filled in.
- Selection is tfcrypt.core.selection's: enforce-mode policies only. Audit-mode policies
  are classified the same way and reported in `audit`, never in the enforced fields.
- Every local IP with a membership has a class (even with an empty remote set), so remote
  churn changes `class_peers` elements only, never `local_class`.
- Peers: every remote node with a record, except records sharing a WireGuard public key
  with another record or with us (WireGuard keys peers by public key; neither is
  configured, the conflict is reported). A peer's allowed IPs are its workloads' IPs that
  appear in some class's remote set, as /32 or /128. A peer with none is still
  configured, so handshakes are ready when a policy starts selecting it.
- A workload's `node` field is where it runs (the controller-signed inventory is trusted).
- An IP claimed by several workloads is reported in `conflicts`. It stays selected for
  each claimant (selection only adds encryption), but goes to a peer's allowed IPs only if
  every claimant is on that one peer's node: WireGuard gives an allowed IP to one peer,
  and picking one of two nodes would let that node receive the other's traffic. A
  selected IP that no peer gets is dropped by the dataplane's guard, never sent in clear.
- `missing_peers`: remote nodes owning a selected IP without a usable record. Their
  traffic must be dropped; the dataplane does it, compute only reports it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tfcrypt.core.selection import Classes, RemoteIndex, classify, rules_of
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Mode
from tfcrypt.model.workload import Workload


@dataclass(frozen=True)
class Snapshot:
    """Verified inputs: workloads by key, policies by name, fresh node records by node."""

    own_node: str
    workloads: Mapping[str, Workload]
    policies: Mapping[str, EncryptionPolicy]
    nodes: Mapping[str, NodeRecord]
    own_public_key: str


@dataclass(frozen=True)
class PeerDesired:
    node: str
    public_key: str
    endpoint: str
    allowed_ips: frozenset[str]


@dataclass(frozen=True)
class AuditReport:
    """What audit-mode policies would add beyond the enforced pairs, and who is not ready."""

    pair_count: int = 0
    per_policy: Mapping[str, int] = field(default_factory=dict)
    missing_peers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Desired:
    """One node's desired selection and peers; compare with `==`."""

    local_class: Mapping[str, str]
    class_peers: Mapping[str, frozenset[str]]
    peers: Mapping[str, PeerDesired]
    selected_pair_count: int
    missing_peers: frozenset[str]
    audit: AuditReport
    conflicts: tuple[str, ...]

    @property
    def selected_remote_ips(self) -> frozenset[str]:
        return frozenset().union(*self.class_peers.values())


def compute(snap: Snapshot) -> Desired:
    """The desired state of `snap.own_node` for the inputs in `snap`."""
    own = snap.own_node
    workloads = tuple(snap.workloads.values())
    index = RemoteIndex(own, workloads)
    enforced = classify(own, workloads, rules_of(snap.policies.values(), Mode.ENFORCE), index)
    records, conflicts = usable_records(snap.nodes, own, snap.own_public_key)
    claims = IpClaims(workloads)
    conflicts += claims.conflicts()

    selected = enforced_remote_ips(enforced)
    peers = {rec.wg_public_key: PeerDesired(
        rec.node, rec.wg_public_key, rec.endpoint,
        frozenset(map(host_cidr, selected.intersection(claims.ips_of(rec.node))
                      - claims.contested)))
        for rec in records.values()}
    missing = claims.nodes_touching([selected], exclude={own, *records})
    return Desired(
        local_class=dict(sorted(enforced.local_class.items())),
        class_peers=dict(sorted(enforced.class_peers.items())),
        peers=dict(sorted(peers.items())),
        selected_pair_count=enforced.pair_count,
        missing_peers=frozenset(missing),
        audit=_audit(snap, workloads, index, enforced, claims, records),
        conflicts=tuple(conflicts),
    )


def usable_records(nodes: Mapping[str, NodeRecord], own_node: str,
                   own_public_key: str) -> tuple[dict[str, NodeRecord], list[str]]:
    """Remote records that can be peers, by node; and the key conflicts that excluded some."""
    remote = {rec.node: rec for _, rec in sorted(nodes.items()) if rec.node != own_node}
    count = Counter(rec.wg_public_key for rec in remote.values())
    count[own_public_key] += 1
    conflicts = []
    for key, n in sorted(count.items()):
        if n > 1:
            holders = sorted(r.node for r in remote.values() if r.wg_public_key == key)
            if key == own_public_key:
                holders = sorted([own_node, *holders])
            conflicts.append(f"public key shared by {', '.join(holders)}: no peer for it")
    usable = {node: rec for node, rec in remote.items() if count[rec.wg_public_key] == 1}
    return usable, conflicts


class IpClaims:
    """Which workloads claim each IP; built in one pass, most IPs having one claimant."""

    def __init__(self, workloads: Iterable[Workload]) -> None:
        self._first: dict[str, Workload] = {}
        self._more: dict[str, list[Workload]] = {}
        self._by_node: dict[str, list[str]] = {}
        for w in workloads:
            self._by_node.setdefault(w.node, []).extend(w.ips)
            for ip in w.ips:
                first = self._first.setdefault(ip, w)
                if first is not w:
                    self._more.setdefault(ip, [first]).append(w)
        self.contested = frozenset(ip for ip, owners in self._more.items()
                                   if len({w.node for w in owners}) > 1)

    def ips_of(self, node: str) -> list[str]:
        """Every IP a workload on `node` claims (contested ones included)."""
        return self._by_node.get(node, [])

    def nodes_touching(self, ip_sets: Iterable[frozenset[str]], exclude: Iterable[str]
                       ) -> frozenset[str]:
        """Nodes, except `exclude`, that claim an IP in one of `ip_sets`."""
        skip = set(exclude)
        sets = list(ip_sets)
        return frozenset(node for node, ips in self._by_node.items() if node not in skip
                         and any(not s.isdisjoint(ips) for s in sets))

    def conflicts(self) -> list[str]:
        found = []
        for ip, owners in self._more.items():
            keys = sorted(w.key.removeprefix("workloads/") for w in owners)
            effect = "" if len({w.node for w in owners}) == 1 else ": given to no peer"
            found.append(f"ip {ip} claimed by {', '.join(keys)}{effect}")
        return sorted(found)


def enforced_remote_ips(classes: Classes) -> frozenset[str]:
    return frozenset().union(*classes.class_peers.values())


def host_cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _audit(snap: Snapshot, workloads: tuple[Workload, ...], index: RemoteIndex,
           enforced: Classes, claims: IpClaims,
           records: Mapping[str, NodeRecord]) -> AuditReport:
    """Pairs each audit policy would add beyond the enforced ones, counted per class group."""
    audited = sorted((p for p in snap.policies.values() if p.mode is Mode.AUDIT),
                     key=lambda p: p.name)
    if not audited:
        return AuditReport()
    classes = [classify(snap.own_node, workloads, rules_of([p], Mode.AUDIT), index)
               for p in audited]
    groups: Counter[tuple[str | None, ...]] = Counter(
        (enforced.local_class.get(ip), *(c.local_class.get(ip) for c in classes))
        for ip in set().union(*(c.local_class for c in classes)))
    per_policy = dict.fromkeys((p.name for p in audited), 0)
    total = 0
    added_sets: list[frozenset[str]] = []
    for (enforced_key, *keys), n in groups.items():
        enforced_set = enforced.class_peers[enforced_key] if enforced_key else frozenset()
        extras: list[frozenset[str]] = []
        for policy, cls, key in zip(audited, classes, keys, strict=True):
            if key is not None:
                extras.append(cls.class_peers[key] - enforced_set)
                per_policy[policy.name] += n * len(extras[-1])
        added = extras[0] if len(extras) == 1 else frozenset().union(*extras)
        total += n * len(added)
        added_sets.append(added)
    missing = claims.nodes_touching(added_sets, exclude={snap.own_node, *records})
    return AuditReport(total, per_policy, missing)
