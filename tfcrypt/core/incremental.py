"""IncrementalCore: compute() kept current across snapshots, for the agent's loop.

Rules (docs/policy.md; DESIGN.md "Shape of the code"):
- `IncrementalCore(own_node).update(snapshot)` always returns a Desired equal (`==`) to
  `compute(snapshot)`; tests/test_selection.py checks it on random sequences of changes.
- It keeps the indexes of the previous snapshot and applies only what changed: a workload
  change touches its IPs' claims, the cached selector results those IPs enter or leave
  (the enforced ones get a new frozenset each), the IPs' selector masks (which move the
  class union sizes and audit counts by the touched IPs only), and the peers of the nodes
  that claim them; a local workload change re-signs its IPs and may add or drop a class
  and the selectors it uses. A policy change (or a 40-bit class key or selector name
  collision, or another own node) rebuilds from scratch.
- Which workloads changed: diffing two 100,000-entry mappings costs more than applying
  one change, so the caller that knows (a watch event names its key) passes the keys;
  without them every value is compared by identity, then equality.
- Infrastructure (tfcrypt/core/infrastructure.py): a plain mapping of workloads is
  screened like compute() screens it (and then compared whole); an Inventory is already
  screened by whoever fed it.
- Pure like the rest of the core: no I/O, no clock. The Desired values it returns are
  never mutated afterwards (new frozensets replace changed ones), so the caller may keep
  the previous one to compare.
- Its parts: who claims each IP (Claims, tfcrypt/core/claims.py), one rule set's classes
  (ClassTable, tfcrypt/core/class_table.py; one enforced, one per audit policy), selector
  masks and bitmaps (tfcrypt/core/counting.py), over one tracked RemoteIndex.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from tfcrypt.core.claims import Claims
from tfcrypt.core.class_table import ClassTable, RebuildNeeded
from tfcrypt.core.collector import collector_paused
from tfcrypt.core.compute import (
    AuditReport,
    Desired,
    PeerDesired,
    Snapshot,
    allowed_ips,
    audit_adds,
    group_bits,
    usable_records,
)
from tfcrypt.core.counting import Bitmaps, SelectorMasks
from tfcrypt.core.infrastructure import Infrastructure, infrastructure_of, screened
from tfcrypt.core.inventory import queryable
from tfcrypt.core.inventory_index import InventoryIndex
from tfcrypt.core.remote_index import RemoteIndex
from tfcrypt.core.selection import SelectorKey, rules_of, selector_name
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Mode
from tfcrypt.model.workload import Workload


class IncrementalCore:
    """compute() for one node, kept current across snapshots (see the module rules).

    Call `update(snapshot, changed_workloads)` after every batch of input events; pass
    the keys (of `snapshot.workloads`) that were put or deleted since the previous call
    when known, or None to have them found by comparison. Policies and node records are
    always compared (they are few).
    """

    def __init__(self, own_node: str) -> None:
        self.own_node = own_node
        self.desired: Desired | None = None
        self.rebuilds = 0
        self._infra_inputs: tuple[dict[str, str], dict[str, NodeRecord]] | None = None
        self._infra_value = Infrastructure()

    # -- entry point -----------------------------------------------------------------

    @collector_paused
    def update(self, snap: Snapshot, changed_workloads: Iterable[str] | None = None) -> Desired:
        """The Desired of `snap` (== compute(snap)), reusing what did not change."""
        if snap.own_node != self.own_node:
            raise ValueError(f"snapshot of {snap.own_node}, core of {self.own_node}")
        infra = self._infrastructure(snap)
        self._infra = infra.prefixes
        self._refused: Mapping[str, str] = {}
        if infra and queryable(snap.workloads) is None:
            plain, self._refused = screened(snap.workloads, infra)
            if plain is not snap.workloads:
                snap = replace(snap, workloads=plain)
                changed_workloads = None
        if self.desired is None or dict(snap.policies) != self._policies:
            return self._rebuild(snap)
        keys = (self._changed_keys(snap.workloads) if changed_workloads is None
                else set(changed_workloads))
        try:
            self._apply_workloads(snap.workloads, keys)
        except RebuildNeeded:
            return self._rebuild(snap)
        if dict(snap.nodes) != self._nodes or snap.own_public_key != self._own_key:
            self._apply_records(snap)
        self.desired = self._assemble()
        return self.desired

    def _changed_keys(self, workloads: Mapping[str, Workload]) -> set[str]:
        old = self._workloads
        keys = {k for k, w in workloads.items() if old.get(k) is not w and old.get(k) != w}
        new_keys = sum(1 for k in keys if k not in old)
        if len(old) - len(workloads) + new_keys:
            keys |= old.keys() - workloads.keys()
        return keys

    def _infrastructure(self, snap: Snapshot) -> Infrastructure:
        """infrastructure_of(snap), rebuilt only when its inputs changed (~5 ms at 1,000
        nodes otherwise, on every update)."""
        inputs = (dict(snap.infrastructure), dict(snap.nodes))
        if self._infra_inputs != inputs:
            self._infra_inputs = inputs
            self._infra_value = infrastructure_of(snap.infrastructure, snap.nodes)
        return self._infra_value

    # -- full rebuild ----------------------------------------------------------------

    def _rebuild(self, snap: Snapshot) -> Desired:
        self.rebuilds += 1
        own = self.own_node
        # an Inventory (the agent's) gives its maintained postings and claims as copies;
        # a plain mapping (or an address claimed twice) is indexed here
        inventory = queryable(snap.workloads)
        if inventory is None:
            workloads = tuple(snap.workloads.values())
            local = [w for w in workloads if w.node == own]
            index = self._index = RemoteIndex(own, workloads)
        else:
            local = inventory.workloads_on(own)
            index = self._index = inventory.remote_index(own)
        self._workloads: dict[str, Workload] = dict(snap.workloads.items())
        self._policies: dict[str, EncryptionPolicy] = dict(snap.policies)
        self._enforced = ClassTable(own, local,
                                    rules_of(snap.policies.values(), Mode.ENFORCE), index)
        audited = sorted((p for p in snap.policies.values() if p.mode is Mode.AUDIT),
                         key=lambda p: p.name)
        self._audit_names = [p.name for p in audited]
        self._audit = [ClassTable(own, local, rules_of([p], Mode.AUDIT), index)
                       for p in audited]
        built = self._enforced.built
        assert built is not None
        self._names: dict[SelectorKey, str] = {k: n for n, k in built.selector_keys.items()}
        self._selector_ips: dict[str, frozenset[str]] = dict(built.selector_ips)
        self._selected: set[str] = set(built.selected_remote_ips())
        for table in (self._enforced, *self._audit):
            table.built = None
        self._masks: SelectorMasks[SelectorKey] = SelectorMasks()
        for key in index.selectors():
            self._masks.add(key, index.result(key))
        self._masks.counts()
        self._key_of_bit = {b: key for key, b in self._masks.bit.items()}
        # selector results as bitmaps too (kept current with the masks): a new class's
        # union size or a new audit group's counts is then a few ORs and a popcount
        if inventory is None:
            self._bitmaps = Bitmaps(index.numbering())
            self._bm = {key: self._bitmaps.of(index.result(key)) for key in index.selectors()}
            self._bitmaps.forget()
        else:  # ANDs of the inventory's rows, positions its slots
            selectors = index.selectors()
            view = InventoryIndex(inventory, own, set().union(*(k for k, _ in selectors)))
            self._bitmaps = Bitmaps(inventory.numbering(), inventory.width)
            self._bm = {key: view.bitmap(key) for key in selectors}
            view.forget_unused_rows()
        self._enforced.fill(self._masks, self._size_of)
        for table in self._audit:
            table.fill(self._masks, None)
        index.track()
        self._enforced_bits = self._masks.of(self._enforced.selector_users)
        self._claims = Claims(snap.workloads.values()) if inventory is None else (
            Claims.of_inventory(inventory))
        self._group_stats: dict[tuple[str | None, ...], tuple[tuple[int, ...], int]] = {}
        self._audit_missing: set[str] = set()
        self._set_records(snap)
        self._peers: dict[str, PeerDesired] = {}
        self._missing: set[str] = set()
        self._refresh_nodes(set(self._records) | set(self._claims.on_node))
        self._refresh_audit(set(self._claims.on_node))
        self.desired = self._assemble()
        return self.desired

    def _set_records(self, snap: Snapshot) -> None:
        self._nodes: dict[str, NodeRecord] = dict(snap.nodes)
        self._own_key = snap.own_public_key
        self._records, self._key_conflicts = usable_records(snap.nodes, self.own_node,
                                                            snap.own_public_key)

    # -- workload changes ------------------------------------------------------------

    def _apply_workloads(self, workloads: Mapping[str, Workload], keys: set[str]) -> None:
        removed: list[Workload] = []
        added: list[Workload] = []
        for workload_key in keys:
            before, after = self._workloads.get(workload_key), workloads.get(workload_key)
            if before == after:
                continue
            if before is not None:
                removed.append(before)
                del self._workloads[workload_key]
            if after is not None:
                added.append(after)
                self._workloads[workload_key] = after
        if not (removed or added):
            return
        claims = self._claims
        for w in removed:
            claims.remove(w)
        for w in added:
            claims.add(w)
        ips = {ip for w in (*removed, *added) for ip in w.ips}
        was_contested = {ip for ip in ips if ip in claims.contested}
        claims.refresh(ips)
        dirty_nodes = {w.node for w in (*removed, *added)}
        dirty_nodes |= {n for ip in ips if (ip in claims.contested) != (ip in was_contested)
                        for n in claims.nodes_of(ip)}

        index, masks = self._index, self._masks
        touched, changed = index.update(removed, added)
        moves: list[tuple[str, int, int]] = []
        if changed:
            bits = list(masks.bit.items())
            for y in touched:
                new = 0
                for key, b in bits:
                    if y in index.result(key):
                        new |= b
                old = masks.set(y, new)
                if old != new:
                    moves.append((y, old, new))
                    self._flip_bits(y, old ^ new)
        self._enforced.remote_moved(moves)
        flips: set[str] = set()
        eb = self._enforced_bits
        for y, old, new in moves:
            if bool(old & eb) != bool(new & eb):
                flips.add(y)
                (self._selected.add if new & eb else self._selected.discard)(y)
        for key in changed:
            name = self._names.get(key)
            if name is not None:
                self._selector_ips[name] = frozenset(index.result(key))
        self._audit_delta(moves)

        appeared, gone = self._enforced.local_changed(removed, added, claims)
        for table in self._audit:
            table.local_changed(removed, added, claims)
        for key in index.selectors():
            if key not in masks.bit:
                masks.add(key, index.result(key))
                self._key_of_bit[masks.bit[key]] = key
                self._bm[key] = self._bitmaps.grown(index.result(key))
        self._enforced.fill(masks, self._size_of)
        for table in self._audit:
            table.fill(masks, None)
        if appeared or gone:
            flips |= self._selectors_changed(appeared, gone)
        dirty_nodes |= {n for ip in flips for n in claims.nodes_of(ip)}
        self._refresh_nodes(dirty_nodes)
        local_moved = any(w.node == self.own_node for w in (*removed, *added))
        # dirty_nodes always: a node whose last workload left is in on_node no more, and
        # its audit state must still be cleared
        audit_nodes = dirty_nodes | (set(claims.on_node) if local_moved else {
            n for ip in touched for n in claims.nodes_of(ip)})
        self._refresh_audit(audit_nodes)

    def _selectors_changed(self, appeared: set[SelectorKey], gone: set[SelectorKey]
                           ) -> set[str]:
        """After local changes: name the selectors the enforced classes started or stopped
        using, and return the IPs that entered or left the selected set (the IPs whose
        mask meets the bits of the selectors in use)."""
        index, masks = self._index, self._masks
        for key in gone:
            del self._selector_ips[self._names.pop(key)]
        for key in appeared:
            name = selector_name(key)
            if name in self._selector_ips:
                raise RebuildNeeded
            self._names[key] = name
            self._selector_ips[name] = frozenset(index.result(key))
        if any("_" in name for name in self._selector_ips):
            raise RebuildNeeded  # compute suffixes collisions in sorted order: let it decide
        eb = self._enforced_bits = masks.of(self._enforced.selector_users)
        flips: set[str] = set()
        for key in appeared | gone:
            for y in index.result(key):
                now = bool(masks.mask.get(y, 0) & eb)
                if now != (y in self._selected):
                    flips.add(y)
                    (self._selected.add if now else self._selected.discard)(y)
        return flips

    def _flip_bits(self, ip: str, changed: int) -> None:
        """Keep the selector bitmaps in step with a remote IP's mask change."""
        at = 1 << (8 * self._bitmaps.place(ip))
        while changed:
            low = changed & -changed
            key = self._key_of_bit[low]
            self._bm[key] ^= at
            changed ^= low

    def _size_of(self, selectors: Iterable[SelectorKey]) -> int:
        return self._union_bm(selectors).bit_count()

    def _union_bm(self, selectors: Iterable[SelectorKey]) -> int:
        found = 0
        for key in selectors:
            found |= self._bm[key]
        return found

    # -- records ---------------------------------------------------------------------

    def _apply_records(self, snap: Snapshot) -> None:
        old = self._records
        self._set_records(snap)
        nodes = {n for n in old.keys() | self._records.keys()
                 if old.get(n) != self._records.get(n)}
        self._refresh_nodes(nodes)
        self._refresh_audit(nodes)

    def _refresh_nodes(self, nodes: Iterable[str]) -> None:
        """Peers and missing_peers for `nodes`, from the selected set and the records."""
        nodes = set(nodes)
        for peer_key in [k for k, p in self._peers.items() if p.node in nodes]:
            del self._peers[peer_key]
        for node in nodes:
            self._missing.discard(node)
            if node == self.own_node:
                continue
            rec = self._records.get(node)
            ips = self._claims.ips_of(node)
            if rec is not None:
                self._peers[rec.wg_public_key] = PeerDesired(
                    rec.node, rec.wg_public_key, rec.endpoint,
                    allowed_ips(self._selected, ips, self._claims.contested))
            elif any(ip in self._selected for ip in ips):
                self._missing.add(node)

    # -- audit -----------------------------------------------------------------------

    def _groups(self) -> Counter[tuple[str | None, ...]]:
        audited = [t.local_class for t in self._audit]
        enforced = self._enforced.local_class
        return Counter((enforced.get(ip), *(c.get(ip) for c in audited))
                       for ip in set().union(*audited))

    def _group_bits(self, group: tuple[str | None, ...]) -> tuple[int, ...]:
        return group_bits(group, self._enforced.bits, [t.bits for t in self._audit])

    def _audit_delta(self, moves: Sequence[tuple[str, int, int]]) -> None:
        """Move each group's counts by the remote IPs whose masks changed."""
        if not self._audit or not moves:
            return
        for group, (counts, count) in list(self._group_stats.items()):
            enforced, *audited = self._group_bits(group)
            any_audit = 0
            for b in audited:
                any_audit |= b
            delta = [0] * len(audited)
            total = 0
            for _, old, new in moves:
                was_out, is_out = not old & enforced, not new & enforced
                for i, b in enumerate(audited):
                    delta[i] += bool(is_out and new & b) - bool(was_out and old & b)
                total += bool(is_out and new & any_audit) - bool(was_out and old & any_audit)
            if total or any(delta):
                self._group_stats[group] = (
                    tuple(c + d for c, d in zip(counts, delta, strict=True)), count + total)

    def _refresh_audit(self, nodes: Iterable[str]) -> None:
        """Counts for groups not seen before (on the selector bitmaps), and audit
        missing_peers for `nodes`."""
        if not self._audit:
            return
        groups = self._groups()
        stats = {}
        tables = (self._enforced, *self._audit)
        for group in groups:
            found = self._group_stats.get(group)
            if found is None:
                outside = (~self._union_bm(self._enforced.selectors[group[0]])
                           if group[0] else -1)
                audited = [self._union_bm(tables[t].selectors[k]) if k is not None else 0
                           for t, k in enumerate(group[1:], start=1)]
                together = 0
                for b in audited:
                    together |= b
                found = (tuple((b & outside).bit_count() for b in audited),
                         (together & outside).bit_count())
            stats[group] = found
        self._group_stats = stats
        self._groups_now = groups
        nodes = set(nodes)
        self._audit_missing -= nodes
        candidates = [n for n in nodes if n != self.own_node and n not in self._records]
        if candidates:
            group_masks = [self._group_bits(g) for g in groups]
            mask = self._masks.mask
            self._audit_missing.update(
                n for n in candidates
                if any(audit_adds(mask.get(ip, 0), group_masks) for ip in self._claims.ips_of(n)))

    def _audit_report(self) -> AuditReport:
        if not self._audit:
            return AuditReport()
        per_policy = dict.fromkeys(self._audit_names, 0)
        total = 0
        for group, n in self._groups_now.items():
            counts, count = self._group_stats[group]
            for name, c in zip(self._audit_names, counts, strict=True):
                per_policy[name] += n * c
            total += n * count
        return AuditReport(total, per_policy, frozenset(self._audit_missing))

    # -- output ----------------------------------------------------------------------

    def _assemble(self) -> Desired:
        enforced = self._enforced
        names = self._names
        return Desired(
            local_class=dict(sorted(enforced.local_class.items())),
            class_selectors={k: frozenset(names[s] for s in enforced.selectors[k])
                             for k in sorted(enforced.selectors)},
            selector_ips=dict(sorted(self._selector_ips.items())),
            peers=dict(sorted(self._peers.items())),
            selected_pair_count=enforced.pair_count,
            missing_peers=frozenset(self._missing),
            audit=self._audit_report(),
            conflicts=(*self._key_conflicts, *sorted(self._claims.conflicts.values())),
            infrastructure=self._infra,
            refused=self._refused,
        )
