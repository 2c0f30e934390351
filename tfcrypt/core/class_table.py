"""ClassTable: one rule set's classes for the local IPs, kept current by the incremental
core (tfcrypt/core/incremental.py), with the union sizes counted on selector masks
(tfcrypt/core/counting.py SelectorMasks).

Invariants (between IncrementalCore updates):
- `local_class`, `signature`, `selectors` equal what classify() (tfcrypt/core/selection.py)
  gives for the current local workloads and rules: each local IP with a membership has
  the class of its signature, and a class exists exactly while some local IP uses it
  (`users` counts them).
- `selector_users` counts, per selector key, the classes using it; a selector is released
  when its count reaches zero.
- `bits[k]` is the mask of class k's selectors; `sizes[k]`, when sizes are kept (the
  enforced table), is the size of the union of their results.
- A case whose answer would depend on order (a class key collision) raises RebuildNeeded
  instead of guessing: the caller rebuilds from scratch, as compute() would number it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import chain

from tfcrypt.core.claims import Claims
from tfcrypt.core.counting import SelectorMasks
from tfcrypt.core.remote_index import RemoteIndex
from tfcrypt.core.selection import (
    Classes,
    Membership,
    RuleRef,
    SelectorKey,
    class_key,
    classify,
    remote_selector,
    workload_memberships,
)
from tfcrypt.model.workload import Workload


class RebuildNeeded(Exception):
    """An incremental step met a case only a full rebuild handles (class key collision)."""


class ClassTable:
    """One rule set's classes for the local IPs, kept current.

    A class is its selectors (remote side of each membership); `bits` is their mask in the
    shared SelectorMasks and `sizes` how many remote IPs the class selects (the size of
    the union of its selectors' sets, counted on masks, never built).

    Pitfall: a class's key depends only on its signature; a new signature whose hash
    collides with a live class would get a suffix that depends on order, which compute
    assigns in sorted order: that case raises RebuildNeeded rather than guess.
    """

    def __init__(self, own_node: str, workloads: Sequence[Workload], rules: Sequence[RuleRef],
                 index: RemoteIndex) -> None:
        self.own_node = own_node
        self.rules = rules
        self.index = index
        self._by_ref = {(ref.policy, ref.index): ref.rule for ref in rules}
        built = classify(own_node, workloads, rules, index)
        self.built: Classes | None = built
        self.local_class: dict[str, str] = dict(built.local_class)
        self.signature: dict[str, frozenset[Membership]] = dict(built.signatures)
        self.key_of: dict[frozenset[Membership], str] = {s: k for k, s in self.signature.items()}
        self.users: Counter[str] = Counter(self.local_class.values())
        self.members: dict[str, dict[str, frozenset[Membership]]] = {
            w.key: workload_memberships(w, rules) for w in workloads if w.node == own_node}
        self.selectors: dict[str, frozenset[SelectorKey]] = {
            k: frozenset(built.selector_keys[n] for n in names)
            for k, names in built.class_selectors.items()}
        self.selector_users: Counter[SelectorKey] = Counter(
            chain.from_iterable(self.selectors.values()))
        self.bits: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def _selector(self, m: Membership) -> SelectorKey:
        return self.index.register(*remote_selector(m, self._by_ref[(m.policy, m.rule)]))

    def fill(self, masks: SelectorMasks[SelectorKey],
             size_of: Callable[[frozenset[SelectorKey]], int] | None) -> None:
        """Mask bits (and, with `size_of`, union sizes) of the classes that lack them."""
        for key, selectors in self.selectors.items():
            if key not in self.bits:
                self.bits[key] = masks.of(selectors)
                if size_of is not None:
                    self.sizes[key] = size_of(selectors)

    def remote_moved(self, moves: Sequence[tuple[str, int, int]]) -> None:
        """Remote IPs changed masks (ip, old, new): move the class sizes."""
        if not self.sizes:
            return
        for key, b in self.bits.items():
            delta = 0
            for _, old, new in moves:
                delta += bool(new & b) - bool(old & b)
            if delta:
                self.sizes[key] += delta

    def local_changed(self, removed: Iterable[Workload], added: Iterable[Workload],
                      claims: Claims) -> tuple[set[SelectorKey], set[SelectorKey]]:
        """Re-sign the IPs of changed local workloads; return the selectors that some class
        started using and those that no class uses any more. New classes get bits and
        sizes from `fill`, once the masks know their selectors."""
        touched: set[str] = set()
        for w in removed:
            if w.node == self.own_node:
                self.members.pop(w.key, None)
                touched.update(w.ips)
        for w in added:
            if w.node == self.own_node:
                self.members[w.key] = workload_memberships(w, self.rules)
                touched.update(w.ips)
        appeared: set[SelectorKey] = set()
        gone: set[SelectorKey] = set()
        for ip in touched:
            signature = frozenset().union(*(
                self.members[w.key].get(ip, frozenset()) for w in claims.owners.get(ip)
                if w.node == self.own_node))
            old = self.local_class.pop(ip, None)
            if old is not None:
                self.users[old] -= 1
                if not self.users[old]:
                    del self.users[old]
                    gone |= self._drop(old)
            if signature:
                key = self.key_of.get(signature)
                if key is None:
                    key, new = self._add(signature)
                    appeared |= new
                self.local_class[ip] = key
                self.users[key] += 1
        return appeared - gone, gone - appeared

    def _add(self, signature: frozenset[Membership]) -> tuple[str, set[SelectorKey]]:
        key = class_key(signature)
        if key in self.signature:
            raise RebuildNeeded
        selectors = frozenset(self._selector(m) for m in signature)
        self.signature[key] = signature
        self.key_of[signature] = key
        self.selectors[key] = selectors
        first = {s for s in selectors if not self.selector_users[s]}
        self.selector_users.update(selectors)
        return key, first

    def _drop(self, key: str) -> set[SelectorKey]:
        del self.key_of[self.signature.pop(key)]
        self.bits.pop(key, None)
        self.sizes.pop(key, None)
        released = set()
        for s in self.selectors.pop(key):
            self.selector_users[s] -= 1
            if not self.selector_users[s]:
                del self.selector_users[s]
                released.add(s)
        return released

    @property
    def pair_count(self) -> int:
        return sum(self.sizes[k] * n for k, n in self.users.items())
