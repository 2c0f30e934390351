"""The desired `table inet tfcrypt`, kept across updates so that an update costs its change.

Rules of this module:
- Pure: no I/O. `DesiredTable.update(NftDesired)` (or `desired_table`) gives the
  `TableState` the manager diffs against the listing (tfcrypt/dataplane/nft_listing.py).
- Desired state is kept, not rebuilt: `DesiredTable` reuses the element dicts of every
  selector set whose value is equal to the last one, so an update costs the sets that
  changed (and the small skeleton: base objects, class chains and rules, local maps).
- It places objects and elements; what a rule says is built in
  tfcrypt/dataplane/nft_rules.py.
- Addresses are canonicalised through a cache (remote IPs recur in several selector sets).
- The infrastructure interval sets (`infra_v4`, `infra_v6`) are part of the skeleton
  and exist, possibly empty, whenever the table does; their elements are a few hundred
  at most and are recomputed on every update, reported as changed only when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfcrypt.dataplane.nft_rules import base_rules, class_rules
from tfcrypt.dataplane.nft_table import (
    BY_SUFFIX,
    COUNTERS,
    EGRESS_GUARD,
    FAMILIES,
    FLOW_FLAGS,
    FORWARD,
    INTERVAL,
    LOCAL_MAPS,
    PREROUTING,
    SELECTED,
    BaseHook,
    Fam,
    NftDesired,
    RuleSpec,
    SetSpec,
    TableState,
    canonical_ip,
    drop_chain,
    flow_set_type,
    flow_sets,
    fwd_chain,
    in_chain,
    infra_elements,
    infra_set,
    out_chain,
    pre_chain,
    set_name,
    validate,
)

_CANON_CACHE_MAX = 1 << 21
_NO_PEERS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _SetMembers:
    """A selector's remote IPs as last given, and whether any was spelled non-canonically."""

    src: frozenset[str]
    aliased: bool


class DesiredTable:
    """The desired `TableState`, kept across updates so that an update costs its change.

    Pitfalls:
    - A selector whose remote IPs are `==` to the last ones (identity first, then a C-level
      frozenset compare) keeps its element dicts; those dicts are never mutated afterwards
      (a changed selector gets new dicts), so a state handed out stays valid.
    - Input may spell one address two ways ("fd00::9", "fd00:0::9"). A selector where that
      ever happened is recanonicalised whole when it changes: removing one spelling by
      the fast path would drop an element still desired under the other.
    - `update()` is atomic: on ConfigError nothing changes.
    """

    def __init__(self) -> None:
        self.desired: NftDesired | None = None
        self.state = TableState()
        self._selectors: dict[str, _SetMembers] = {}
        self._rules: dict[tuple[object, ...], list[RuleSpec]] = {}
        self._canon: dict[str, tuple[Fam, str]] = {}
        self._shape: tuple[object, ...] = ()
        self.skeleton_changed = True
        """Whether the last update changed anything but elements (counters, sets, chains,
        rules): the manager skips diffing the ~10 k rules when it did not."""

    def canonical(self, text: str) -> tuple[Fam, str]:
        """`canonical_ip` through a cache (remote IPs recur in several selector sets)."""
        hit = self._canon.get(text)
        if hit is None:
            if len(self._canon) >= _CANON_CACHE_MAX:
                self._canon.clear()
            hit = self._canon[text] = canonical_ip(text)
        return hit

    def update(self, d: NftDesired) -> set[str]:
        """Make `state` the table for `d`; returns the selector sets whose elements changed."""
        validate(d)
        infra = infra_elements(d.infrastructure)
        mask = d.mask if d.mask is not None else d.mark
        old = self.state
        shape = (d.mark, mask, d.enforce, d.wg_ifname, d.flows,
                 frozenset(d.local_class.values()), frozenset(d.selector_ips))
        same_skeleton = (self.desired is not None and shape == self._shape
                         and d.class_selectors == self.desired.class_selectors)
        state = TableState(counters=set(COUNTERS))
        for name in LOCAL_MAPS:
            state.elements[name] = {}
        rule_cache: dict[tuple[object, ...], list[RuleSpec]] = {}

        def cached(key: str, selectors: frozenset[str] = frozenset()) -> list[RuleSpec]:
            at = (key, selectors, d.mark, mask, d.enforce, d.wg_ifname, d.flows is None)
            found = self._rules.get(at)
            if found is None:
                found = (base_rules(d, mask) if key == ""
                         else class_rules(key, selectors, d, mask))
            rule_cache[at] = found
            return found

        if same_skeleton:  # chains, sets and rules are the last ones (never mutated)
            state.counters, state.chains, state.sets = old.counters, old.chains, old.sets
            state.rules, rule_cache = old.rules, self._rules
        else:
            state.chains[PREROUTING] = BaseHook("filter", "prerouting", -150, "accept")
            state.chains[EGRESS_GUARD] = BaseHook("filter", "postrouting", 0, "accept")
            state.chains[SELECTED] = None
            for fam in FAMILIES:
                state.chains[pre_chain(fam)] = None
            for name in LOCAL_MAPS:
                state.sets[name] = SetSpec(BY_SUFFIX[name[-2:]].addr_type, "verdict")
            for fam in FAMILIES:
                state.sets[infra_set(fam)] = SetSpec(fam.addr_type, flags=INTERVAL)
            if d.flows is not None:
                _add_flow_objects(state, d)
        rules = [] if same_skeleton else list(cached(""))
        members: dict[str, _SetMembers] = {}
        changed: set[str] = set()
        for name, elements in infra.items():
            if old.elements.get(name) == elements and self.desired is not None:
                state.elements[name] = old.elements[name]
            else:
                state.elements[name] = elements
                changed.add(name)
        used = {n for names in d.class_selectors.values() for n in names}
        for selector in sorted({*d.selector_ips, *used}):
            names = [set_name(selector, fam) for fam in FAMILIES]
            if not same_skeleton:
                for fam, name in zip(FAMILIES, names, strict=True):
                    state.sets[name] = SetSpec(fam.addr_type)
            src = d.selector_ips.get(selector, _NO_PEERS)
            prev = self._selectors.get(selector)
            if prev is not None and (prev.src is src or prev.src == src):
                members[selector] = prev
                state.elements.update((n, old.elements[n]) for n in names)
            else:
                members[selector] = self._set_members(selector, src, prev, state)
                changed.update(names)
        if not same_skeleton:
            for key in sorted({*d.local_class.values(), *d.class_selectors}):
                state.chains[out_chain(key)] = None
                state.chains[in_chain(key)] = None
                rules.extend(cached(key, frozenset(d.class_selectors.get(key, ()))))
            state.rules = {(r.chain, r.comment): r for r in rules}
        for ip, key in d.local_class.items():
            fam, canon = self.canonical(ip)
            state.elements[f"out_{fam.suffix}"][canon] = out_chain(key)
            state.elements[f"in_{fam.suffix}"][canon] = in_chain(key)
        self.skeleton_changed = not same_skeleton and (
            self.desired is None or state.rules.keys() != old.rules.keys()
            or state.sets != old.sets or state.chains != old.chains
            or state.counters != old.counters)
        self.desired, self.state, self._selectors, self._rules = d, state, members, rule_cache
        self._shape = shape
        return changed

    def _set_members(self, key: str, src: frozenset[str], prev: _SetMembers | None,
                     state: TableState) -> _SetMembers:
        """Fill `state` with the selector's new element dicts (fresh ones, never the old)."""
        names = {fam.suffix: set_name(key, fam) for fam in FAMILIES}
        if prev is not None and not prev.aliased:
            added = [(ip, *self.canonical(ip)) for ip in src - prev.src]
            removed = [(ip, *self.canonical(ip)) for ip in prev.src - src]
            if all(ip == canon for ip, _, canon in [*added, *removed]):
                members = {n: dict(self.state.elements[n]) for n in names.values()}
                for _, fam, canon in removed:
                    members[names[fam.suffix]].pop(canon, None)
                for _, fam, canon in added:
                    members[names[fam.suffix]][canon] = None
                state.elements.update(members)
                return _SetMembers(src, aliased=False)
        # a whole set at once (first apply: ~0.34 M elements): cache lookups in C, the
        # misses canonicalised one by one
        hits = list(map(self._canon.get, src))
        if None in hits:
            hits = [hit if hit is not None else self.canonical(ip)
                    for ip, hit in zip(src, hits, strict=True)]
        v4, v6 = FAMILIES
        state.elements[names[v4.suffix]] = dict.fromkeys(c for f, c in hits if f is v4)
        state.elements[names[v6.suffix]] = dict.fromkeys(c for f, c in hits if f is v6)
        aliased = any(c != ip for ip, (_, c) in zip(src, hits, strict=True))
        return _SetMembers(src, aliased)


def _add_flow_objects(state: TableState, d: NftDesired) -> None:
    """The flow-accounting chains and sets (their elements are the kernel's: none here)."""
    assert d.flows is not None
    state.chains[FORWARD] = BaseHook("filter", "forward", 0, "accept")
    for fam in FAMILIES:
        state.chains[fwd_chain(fam)] = None
        if d.enforce:
            state.chains[drop_chain(fam)] = None
    for name, kind, fam, ports in flow_sets():
        if kind != "drop" or d.enforce:
            state.sets[name] = SetSpec(flow_set_type(kind, fam, ports), flags=FLOW_FLAGS,
                                       timeout=d.flows.timeout, size=d.flows.size)


def desired_table(d: NftDesired) -> TableState:
    """The whole table for `d`; raises ConfigError for input that cannot become nft names."""
    table = DesiredTable()
    table.update(d)
    return table.state
