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
- Infrastructure addresses (tfcrypt/core/infrastructure.py: every node record's address,
  plus `Snapshot.infrastructure`: the agent's own, the etcd endpoints, configured CIDRs)
  are never selected: a plain mapping of workloads is screened here first, each refused
  address reported in `Desired.refused` with its reason; an Inventory is screened as it
  is fed (the agent's CoreInput, with `Screen`), and the agent fills `refused` itself.
- `Snapshot.workloads` may be an Inventory (the agent's, tfcrypt/core/inventory.py):
  selection then queries its maintained postings instead of indexing every workload
  (the result is the same: tests/test_inventory.py). Its rows are caches compute may
  make or drop; nothing it answers changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, groupby
from operator import attrgetter

from tfcrypt.core.collector import collector_paused
from tfcrypt.core.counting import union_of
from tfcrypt.core.infrastructure import infrastructure_of, screened
from tfcrypt.core.inventory import queryable
from tfcrypt.core.inventory_index import InventoryIndex
from tfcrypt.core.postings import planned_keys
from tfcrypt.core.remote_index import RemoteIndex
from tfcrypt.core.selection import (
    Classes,
    RuleRef,
    SelectorIndex,
    class_unions,
    classify,
    rules_of,
)
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Mode
from tfcrypt.model.workload import Workload


@dataclass(frozen=True)
class Snapshot:
    """Verified inputs: workloads by key, policies by name, fresh node records by node;
    `infrastructure`: prefix -> reason of the addresses no workload may claim besides
    the node records' (the agent's own, the etcd endpoints, configured CIDRs)."""

    own_node: str
    workloads: Mapping[str, Workload]
    policies: Mapping[str, EncryptionPolicy]
    nodes: Mapping[str, NodeRecord]
    own_public_key: str
    infrastructure: Mapping[str, str] = field(default_factory=dict)


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
    """One node's desired selection and peers; compare with `==`.

    `local_class`: local IP -> class key; `class_selectors`: class key -> the names of its
    selectors; `selector_ips`: selector name -> the remote IPs it selects. A class selects
    the union of its selectors' sets; that union is not stored (see docs/policy.md,
    "Scale"): `class_peers` builds it on demand, O(elements), for tests and small views.
    `infrastructure`: the prefixes never selected (the dataplane's `infra_*` sets);
    `refused`: workload address -> why it was refused for selection.
    """

    local_class: Mapping[str, str]
    class_selectors: Mapping[str, frozenset[str]]
    selector_ips: Mapping[str, frozenset[str]]
    peers: Mapping[str, PeerDesired]
    selected_pair_count: int
    missing_peers: frozenset[str]
    audit: AuditReport
    conflicts: tuple[str, ...]
    infrastructure: frozenset[str] = frozenset()
    refused: Mapping[str, str] = field(default_factory=dict)

    @property
    def class_peers(self) -> dict[str, frozenset[str]]:
        return class_unions(self.class_selectors, self.selector_ips)

    @property
    def selected_remote_ips(self) -> frozenset[str]:
        return union_of(self.selector_ips.values())


@collector_paused
def compute(snap: Snapshot) -> Desired:
    """The desired state of `snap.own_node` for the inputs in `snap`."""
    own = snap.own_node
    enforce_rules = rules_of(snap.policies.values(), Mode.ENFORCE)
    audited = sorted((p for p in snap.policies.values() if p.mode is Mode.AUDIT),
                     key=lambda p: p.name)
    audit_rules = [rules_of([p], Mode.AUDIT) for p in audited]
    inventory = queryable(snap.workloads)
    infra = infrastructure_of(snap.infrastructure, snap.nodes)
    refused: Mapping[str, str] = {}
    if inventory is None:
        plain, refused = screened(snap.workloads, infra)
        workloads: tuple[Workload, ...] = tuple(plain.values())
    else:
        workloads = ()
    if inventory is not None:  # the agent's maintained indexes: a query, no pass
        local = inventory.workloads_on(own)
        claims = IpClaims.unshared({n: inventory.ips_of(n) for n in inventory.nodes()})
    else:
        local = [w for w in workloads if w.node == own]
        claims = IpClaims(workloads)
    planned = planned_keys([enforce_rules, *audit_rules], local)
    index: SelectorIndex = (
        InventoryIndex(inventory, own, planned) if inventory is not None
        else RemoteIndex(own, workloads, keys=planned, unique=not claims.shared))
    enforced = classify(own, local, enforce_rules, index)
    records, conflicts = usable_records(snap.nodes, own, snap.own_public_key)
    conflicts += claims.conflicts()

    selected = enforced.selected_remote_ips()
    peers = {rec.wg_public_key: PeerDesired(
        rec.node, rec.wg_public_key, rec.endpoint,
        allowed_ips(selected, claims.ips_of(rec.node), claims.contested))
        for rec in records.values()}
    missing = claims.nodes_touching([selected], exclude={own, *records})
    bits = class_bitmaps(enforced, index)
    sizes = {key: b.bit_count() for key, b in bits.items()}
    audit = _audit(snap, local, audited, audit_rules, index, bits, enforced, claims, records)
    if isinstance(index, InventoryIndex):
        index.forget_unused_rows()
    return Desired(
        local_class=dict(sorted(enforced.local_class.items())),
        class_selectors=dict(sorted(enforced.class_selectors.items())),
        selector_ips=dict(sorted(enforced.selector_ips.items())),
        peers=dict(sorted(peers.items())),
        selected_pair_count=sum(sizes[k] for k in enforced.local_class.values()),
        missing_peers=frozenset(missing),
        audit=audit,
        conflicts=tuple(conflicts),
        infrastructure=infra.prefixes,
        refused=refused,
    )


def allowed_ips(selected: frozenset[str] | set[str], node_ips: Iterable[str],
                contested: frozenset[str] | set[str]) -> frozenset[str]:
    """A peer's allowed IPs: its node's selected IPs that no other node claims, as hosts."""
    found = selected.intersection(node_ips)
    if contested:
        found -= contested
    # host_cidr, inlined: one function call per selected IP (110,000) costs more than the
    # f-string itself
    return frozenset([f"{ip}/128" if ":" in ip else f"{ip}/32" for ip in found])


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


_NODE = attrgetter("node")
_IPS = attrgetter("ips")


class IpClaims:
    """Which workloads claim each IP; built in one pass, most IPs having one claimant.

    When no IP is claimed twice (the usual inventory), counting is all it takes: the
    per-IP owner map is only built when the count says some IP has several claimants.
    """

    def __init__(self, workloads: Iterable[Workload]) -> None:
        workloads = tuple(workloads)
        by_node: dict[str, list[str]] = {}
        # runs of one node's workloads (the registry lists keys in order, so each node's
        # are adjacent) are taken in one step; any order stays correct, only slower
        for node, run in groupby(workloads, key=_NODE):
            ips = by_node.get(node)
            if ips is None:
                ips = by_node[node] = []
            ips.extend(chain.from_iterable(map(_IPS, run)))
        self._by_node: Mapping[str, Collection[str]] = by_node
        self._more: dict[str, list[Workload]] = {}
        flat = list(chain.from_iterable(by_node.values()))
        if len(set(flat)) != len(flat):
            first: dict[str, Workload] = {}
            for w in workloads:
                for ip in w.ips:
                    owner = first.setdefault(ip, w)
                    if owner is not w:
                        self._more.setdefault(ip, [owner]).append(w)
        self.contested = frozenset(ip for ip, owners in self._more.items()
                                   if len({w.node for w in owners}) > 1)

    @classmethod
    def unshared(cls, by_node: Mapping[str, Collection[str]]) -> IpClaims:
        """Claims of an inventory known to claim no IP twice, from its IPs by node (an
        Inventory keeps them: no pass over the workloads)."""
        claims = cls(())
        claims._by_node = by_node
        return claims

    @property
    def shared(self) -> bool:
        """Whether some IP is claimed by more than one workload."""
        return bool(self._more)

    def ips_of(self, node: str) -> Collection[str]:
        """Every IP a workload on `node` claims (contested ones included)."""
        return self._by_node.get(node, ())

    def nodes_touching(self, ip_sets: Iterable[frozenset[str]], exclude: Iterable[str]
                       ) -> frozenset[str]:
        """Nodes, except `exclude`, that claim an IP in one of `ip_sets`."""
        candidates = self.nodes_except(exclude)
        if not candidates:
            return frozenset()
        sets = list(ip_sets)
        return frozenset(node for node in candidates
                         if any(not s.isdisjoint(self._by_node[node]) for s in sets))

    def nodes_except(self, exclude: Iterable[str]) -> list[str]:
        """Nodes that claim some IP, except `exclude`."""
        skip = set(exclude)
        return [node for node in self._by_node if node not in skip]

    def conflicts(self) -> list[str]:
        return sorted(conflict_text(ip, owners) for ip, owners in self._more.items())


def conflict_text(ip: str, owners: Iterable[Workload]) -> str:
    """How an IP claimed by several workloads is reported."""
    owners = list(owners)
    keys = sorted(w.key.removeprefix("workloads/") for w in owners)
    effect = "" if len({w.node for w in owners}) == 1 else ": given to no peer"
    return f"ip {ip} claimed by {', '.join(keys)}{effect}"


def host_cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def class_bitmaps(classes: Classes, index: SelectorIndex) -> dict[str, int]:
    """Class key -> the bitmap (`RemoteIndex.bitmap`) of the union of its selectors."""
    found = {}
    for key, names in classes.class_selectors.items():
        bits = 0
        for name in names:
            bits |= index.bitmap(classes.selector_keys[name])
        found[key] = bits
    return found


def _audit(snap: Snapshot, local: Sequence[Workload], audited: Sequence[EncryptionPolicy],
           audit_rules: Sequence[Sequence[RuleRef]], index: SelectorIndex,
           enforced_bits: Mapping[str, int], enforced: Classes,
           claims: IpClaims, records: Mapping[str, NodeRecord]) -> AuditReport:
    """Pairs each audit policy would add beyond the enforced ones, counted per class group
    (enforced class, audit class per policy) on bitmaps of the class unions."""
    if not audited:
        return AuditReport()
    classes = [classify(snap.own_node, local, rules, index, results=False)
               for rules in audit_rules]
    audit_bits = [class_bitmaps(c, index) for c in classes]
    groups = audit_groups(enforced.local_class, [c.local_class for c in classes])
    per_policy = dict.fromkeys((p.name for p in audited), 0)
    total = 0
    memo: dict[tuple[int, ...], tuple[tuple[int, ...], int, int]] = {}
    for group, n in groups.items():
        enforced_key, *keys = group
        gb = (enforced_bits[enforced_key] if enforced_key else 0,
              *(b[k] if k is not None else 0 for b, k in zip(audit_bits, keys, strict=True)))
        found = memo.get(gb)
        if found is None:
            outside = ~gb[0]
            together = 0
            for b in gb[1:]:
                together |= b
            added = together & outside
            found = memo[gb] = (tuple((b & outside).bit_count() for b in gb[1:]),
                                added.bit_count(), added)
        counts, count, _ = found
        for policy, policy_count in zip(audited, counts, strict=True):
            per_policy[policy.name] += n * policy_count
        total += n * count
    exclude = {snap.own_node, *records}
    candidates = claims.nodes_except(exclude)
    missing: frozenset[str] = frozenset()
    if candidates:
        added_all = 0
        for _, _, added in memo.values():
            added_all |= added
        holds = index.holds(added_all)
        missing = frozenset(node for node in candidates
                            if any(holds(ip) for ip in claims.ips_of(node)))
    return AuditReport(total, per_policy, missing)


def audit_groups(enforced: Mapping[str, str], audited: Sequence[Mapping[str, str]]
                 ) -> Counter[tuple[str | None, ...]]:
    """How many local IPs share each (enforced class, audit class per policy) tuple, over
    the IPs some audit policy classifies."""
    return Counter((enforced.get(ip), *(c.get(ip) for c in audited))
                   for ip in set().union(*audited))


def group_bits(group: tuple[str | None, ...], enforced_bits: Mapping[str, int],
               audit_bits: Sequence[Mapping[str, int]]) -> tuple[int, ...]:
    """(enforced class bits, audit class bits per policy) of one group; 0 for no class."""
    enforced_key, *keys = group
    return (enforced_bits[enforced_key] if enforced_key else 0,
            *(bits[k] if k is not None else 0 for bits, k in zip(audit_bits, keys, strict=True)))


def audit_adds(mask: int, group_masks: Iterable[tuple[int, ...]]) -> bool:
    """Whether an IP with `mask` is one some group's audit classes add beyond its enforced."""
    for enforced, *audited in group_masks:
        if not mask & enforced and any(mask & b for b in audited):
            return True
    return False

