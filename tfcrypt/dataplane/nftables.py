"""The nftables reconciler: classification marks, strict ingress and the egress guard.

Rules of this module:
- Ownership is the table: tfcrypt owns `table inet tfcrypt` and everything in it, and
  touches nothing outside it. Whatever is in the table and not desired is removed.
- One apply = at most one read and at most one atomic transaction holding only the
  difference: set and map ELEMENTS are added and removed one by one (a set whose selector
  still exists is never flushed and reloaded), objects of new classes and selectors are
  created and those of vanished ones deleted, base chains and rules are created if missing. A second
  apply with the same desired state sends nothing.
- The read (`nft -j list table`, O(table)) happens only on a full apply; an incremental
  apply plans against the last known actual state and diffs only the sets whose desired
  members changed, so it costs the change. Memory is never trusted after a failure: the
  next apply lists again.
- Order inside the transaction makes every reference valid when it is made or dropped:
  removals of map elements, stale rules and set elements first; then new counters, sets,
  maps and chains; then their elements and rules; then the map elements that jump into new
  class chains; last, vanished chains are flushed and vanished maps, chains, sets and
  counters deleted (map elements before chains before sets). Packets never see an
  intermediate state: the kernel commits the batch as a whole.
- A table that cannot be reached by small steps (a set of the wrong type, a base chain on
  the wrong hook, an object kind tfcrypt never creates, table flags such as `dormant`
  that switch the whole table off, a listing nft cannot print) is rebuilt: `delete table` and the
  full contents in the same transaction, so the guard is never absent for a packet.
- No sweep before intent: until `set_desired()` has been called, `apply()` does nothing
  (a table left by a previous run stays untouched and is adopted by the first apply).
- Decide, then act: the command list is built with no await in between; the transaction is
  shielded from cancellation; if nft refuses it, nothing changed in the kernel, the error
  is reported and everything stays pending for the next (full) apply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from tfcrypt.dataplane.delta import DeltaTracker, Plan
from tfcrypt.dataplane.nft_desired import DesiredTable
from tfcrypt.dataplane.nft_json import Nft, NftError, NftUnreadable
from tfcrypt.dataplane.nft_listing import counter_values, parse_listing
from tfcrypt.dataplane.nft_table import (
    FAMILY,
    LOCAL_MAPS,
    TABLE,
    Json,
    NftDesired,
    TableState,
    element_json,
)
from tfcrypt.dataplane.routes import ApplyReport, ItemError

log = logging.getLogger(__name__)

Key = tuple[str, ...]
_Planned = tuple[list[Json], TableState, TableState, Plan[Key, object]]
"""(commands, want, have, plan) of one apply."""
_ERROR_KEY = f"table {FAMILY} {TABLE}"


def _cmd(verb: str, kind: str, **fields: object) -> Json:
    return {verb: {kind: {"family": FAMILY, "table": TABLE, **fields}}}


def _needs_rebuild(want: TableState, have: TableState) -> list[str]:
    """Reasons the table cannot be reconciled in place (empty: it can)."""
    reasons = list(have.foreign)
    reasons += [f"set {n} is {have.sets[n]}" for n in want.sets.keys() & have.sets.keys()
                if want.sets[n] != have.sets[n]]
    reasons += [f"chain {n} is {have.chains[n]}" for n in want.chains.keys() & have.chains.keys()
                if want.chains[n] != have.chains[n]]
    return reasons


def _element_cmds(verb: str, want: TableState, by_set: dict[str, list[str]],
                  have: TableState) -> list[Json]:
    out = []
    for name in sorted(by_set):
        ips = sorted(by_set[name])
        spec = want.sets.get(name) or have.sets[name]
        if verb == "delete":
            elem: list[object] = [have.raw_elements.get((name, ip), element_json(spec, ip))
                                  for ip in ips]
        elif spec.map:
            elem = [[ip, {"jump": {"target": want.elements[name][ip]}}] for ip in ips]
        else:
            elem = [element_json(spec, ip) for ip in ips]
        out.append(_cmd(verb, "element", name=name, elem=elem))
    return out


def build_transaction(want: TableState, have: TableState, plan: Plan[Key, object]) -> list[Json]:
    """The commands that turn `have` into `want`, in reference-safe order; no I/O."""
    dead_sets = {k[1] for k in plan.deletions if k[0] == "set"}
    dead_chains = {k[1] for k in plan.deletions if k[0] == "chain"}
    is_map = {n: bool(s.map) for n, s in [*have.sets.items(), *want.sets.items()]}

    gone: dict[str, list[str]] = {}
    new: dict[str, list[str]] = {}
    for key in plan.deletions:
        if key[0] == "element" and key[1] not in dead_sets:
            gone.setdefault(key[1], []).append(key[2])
    for key in plan.upserts:
        if key[0] == "element":
            new.setdefault(key[1], []).append(key[2])
            if key[2] in have.elements.get(key[1], {}):
                gone.setdefault(key[1], []).append(key[2])

    def split(by_set: dict[str, list[str]], maps: bool) -> dict[str, list[str]]:
        return {n: ips for n, ips in by_set.items() if is_map[n] == maps}

    stale_rules = [(k[1], have.rule_handles[(k[1], k[2])]) for k in plan.deletions
                   if k[0] == "rule" and k[1] not in dead_chains]
    stale_rules += [(c, h) for c, h in have.stray_rules if c not in dead_chains]

    cmds = _element_cmds("delete", want, split(gone, True), have)
    cmds += [_cmd("delete", "rule", chain=c, handle=h) for c, h in sorted(stale_rules)]
    cmds += _element_cmds("delete", want, split(gone, False), have)

    cmds += [_cmd("add", "counter", name=k[1])  # filter, then sort: ~0.35 M upserts at scale
             for k in sorted(k for k in plan.upserts if k[0] == "counter")]
    for key in sorted(k for k in plan.upserts if k[0] == "set"):
        spec = want.sets[key[1]]
        if spec.map:
            cmds.append(_cmd("add", "map", name=key[1], type=spec.type, map=spec.map))
        else:
            extra: dict[str, object] = {"flags": list(spec.flags)} if spec.flags else {}
            extra.update((k, v) for k, v in (("timeout", spec.timeout), ("size", spec.size))
                         if v is not None)
            cmds.append(_cmd("add", "set", name=key[1], type=spec.type_json, **extra))
    for key in sorted(k for k in plan.upserts if k[0] == "chain"):
        hook = want.chains[key[1]]
        base = {} if hook is None else {"type": hook.type, "hook": hook.hook,
                                        "prio": hook.prio, "policy": hook.policy}
        cmds.append(_cmd("add", "chain", name=key[1], **base))
    cmds += _element_cmds("add", want, split(new, False), have)
    if any(k[0] == "rule" for k in plan.upserts):  # in desired order; ~10 k rules at scale
        cmds += [
            _cmd("add", "rule", chain=r.chain, comment=r.comment, expr=r.expr_json())
            for key, r in want.rules.items() if ("rule", *key) in plan.upserts
        ]
    cmds += _element_cmds("add", want, split(new, True), have)

    cmds += [_cmd("flush", "chain", name=n) for n in sorted(dead_chains)]
    cmds += [_cmd("delete", "map", name=n) for n in sorted(dead_sets) if is_map[n]]
    cmds += [_cmd("delete", "chain", name=n) for n in sorted(dead_chains)]
    cmds += [_cmd("delete", "set", name=n) for n in sorted(dead_sets) if not is_map[n]]
    cmds += [_cmd("delete", "counter", name=k[1])
             for k in sorted(k for k in plan.deletions if k[0] == "counter")]
    return cmds


class NftManager:
    """Reconciles `table inet tfcrypt` with an `NftDesired`.

    Full and incremental applies (after Felix: apply deltas, resync periodically):
    - `apply(full=True)` lists the table and diffs everything: drift is seen and repaired.
      The first apply, the one after a failed list or transaction, and after `remove()`
      are always full, whatever the caller asks.
    - `apply()` plans against the last known actual state (what was listed, plus what was
      committed since) and diffs elements only of the sets whose desired members changed
      since the last success, plus the local maps, plus the skeleton (chains, rules) only if
      it changed since the last success: it costs the change, not the table. Drift made
      by hand is not seen until the next full apply.
    - If the incremental plan must delete a rule this manager created since the last listing
      (its kernel handle is unknown), the apply lists first, i.e. becomes full.

    Pitfalls:
    - nft refuses to add a map element whose key exists with another verdict (EEXIST): a
      local address moving to another class is a delete and an add of that one element.
    - Rule expressions are not compared (nft prints them normalised); the comment carries a
      hash of the expression we emitted, so a rule someone edited in place keeping our
      comment is not detected. Rules without our comment are removed (on a full apply).
    - Counters live in the kernel: a rebuild (only for a damaged table) resets them.
    """

    def __init__(self, nft: Nft) -> None:
        self._nft = nft
        self._table = DesiredTable()
        self._actual = TableState()
        self._known = False
        self._dirty: set[str] = set()
        self._skeleton_dirty = True
        self._lock = asyncio.Lock()
        self.last_transaction: list[Json] = []
        self.last_full = False

    def __repr__(self) -> str:
        classes = 0 if self.desired is None else len(list(class_keys(self._table.state)))
        return f"NftManager(nft={self._nft!r}, classes={classes}, pending={len(self.pending)})"

    def set_desired(self, desired: NftDesired) -> None:
        """Record intent (no I/O; costs the classes that changed); raises ConfigError for
        input that cannot be nft names, and then keeps the previous intent."""
        self._dirty |= self._table.update(desired)
        self._skeleton_dirty = self._skeleton_dirty or self._table.skeleton_changed

    @property
    def desired(self) -> NftDesired | None:
        return self._table.desired

    @property
    def pending(self) -> frozenset[Key]:
        """What differs between desired and the last known actual state (after a failed
        apply: what that apply tried to do)."""
        if self.desired is None:
            return frozenset()
        sets = self._dirty | set(LOCAL_MAPS) if self._known else None
        plan = self._diff(self._table.state, self._actual, sets)
        return frozenset(plan.upserts) | plan.deletions

    async def apply(self, full: bool = False) -> ApplyReport:
        """Bring the table to the desired state and return the number of commands sent.

        `full=True` lists the kernel table and diffs all of it (periodic resync, monitor
        events); the default plans against the last known state, and is full anyway when
        that state cannot be trusted (first apply, after a failure)."""
        async with self._lock:
            if self.desired is None:
                return ApplyReport(0)
            planned = None
            if self._known and not full:
                planned = self._incremental_plan()
            self.last_full = planned is None
            if planned is None:
                self._known = False
                try:
                    listing = await self._nft.list_table()
                    have = (TableState() if listing is None
                            else parse_listing(listing, self._table.canonical))
                except NftUnreadable as exc:
                    have, listing = TableState(foreign=[str(exc)]), {}
                except NftError as exc:
                    return self._failed(f"list: {exc}")
                planned = self._full_plan(have, absent=listing is None)
            commands, want, have, plan = planned
            self.last_transaction = commands
            dirty, self._dirty = self._dirty, set()
            skeleton_dirty, self._skeleton_dirty = self._skeleton_dirty, False
            if commands:
                try:
                    await asyncio.shield(self._nft.run(commands))
                except NftError as exc:
                    self._known = False
                    self._dirty |= dirty
                    self._skeleton_dirty = self._skeleton_dirty or skeleton_dirty
                    return self._failed(str(exc))
            self._actual, self._known = _committed(have, want, plan), True
            return ApplyReport(len(commands))

    def _incremental_plan(self) -> _Planned | None:
        """Commands against the last known state, or None when a full listing is needed."""
        want, have = self._table.state, self._actual
        plan = self._diff(want, have, self._dirty | set(LOCAL_MAPS), self._skeleton_dirty)
        dead = {k[1] for k in plan.deletions if k[0] == "chain"}
        if not all((k[1], k[2]) in have.rule_handles for k in plan.deletions
                   if k[0] == "rule" and k[1] not in dead):
            return None
        return build_transaction(want, have, plan), want, have, plan

    def _full_plan(self, have: TableState, absent: bool) -> _Planned:
        want = self._table.state
        prefix: list[Json] = []
        if absent:
            prefix = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
        elif reasons := _needs_rebuild(want, have):
            log.warning("nftables: rebuilding table %s %s: %s", FAMILY, TABLE, "; ".join(reasons))
            prefix = [{"delete": {"table": {"family": FAMILY, "name": TABLE}}},
                      {"add": {"table": {"family": FAMILY, "name": TABLE}}}]
            have = TableState()
        self._actual = have
        plan = self._diff(want, have, None)
        return prefix + build_transaction(want, have, plan), want, have, plan

    @staticmethod
    def _diff(want: TableState, have: TableState, sets: set[str] | None,
              skeleton: bool = True) -> Plan[Key, object]:
        """The plan: skeleton objects unless `skeleton` is False (nothing but elements
        changed since the last success); elements of `sets` only (None: every set)."""
        upserts: dict[Key, object] = {}
        deletions: set[Key] = set()
        if skeleton:
            tracker: DeltaTracker[Key, object] = DeltaTracker()
            tracker.set_desired(want.items(()))
            tracker.load_actual(have.items(()).items())
            plan = tracker.plan()
            upserts, deletions = dict(plan.upserts), set(plan.deletions)
        names = want.elements.keys() | have.elements.keys() if sets is None else sets
        for name in names:
            w, h = want.elements.get(name), have.elements.get(name, {})
            if w is None:
                deletions.update(("element", name, ip) for ip in h)
                continue
            upserts.update((("element", name, ip), ("to", w[ip])) for ip in w.keys() - h.keys())
            deletions.update(("element", name, ip) for ip in h.keys() - w.keys())
            if want.sets[name].map:
                upserts.update((("element", name, ip), ("to", t)) for ip, t in w.items()
                               if ip in h and h[ip] != t)
        return Plan(upserts, frozenset(deletions))

    def _failed(self, message: str) -> ApplyReport:
        log.warning("nftables: %s: %s", _ERROR_KEY, message)
        return ApplyReport(0, (ItemError(_ERROR_KEY, message),))

    async def counters(self) -> dict[str, tuple[int, int]]:
        """Named counters (guard_drops, ingress_drops, ingress_audit) and `out:<class>`."""
        listing = await self._nft.list_table()
        return {} if listing is None else counter_values(listing)

    async def list_set(self, name: str) -> Json | None:
        """One set's listing with its elements (the flow sets: tfcrypt/agent/flows.py)."""
        return await self._nft.list_set(name)

    async def remove(self) -> ApplyReport:
        """Delete the whole table (uninstall) and forget the desired state."""
        async with self._lock:
            self._table = DesiredTable()
            self._actual, self._known, self._dirty = TableState(), False, set()
            self._skeleton_dirty = True
            try:
                if await self._nft.list_table() is None:
                    return ApplyReport(0)
                await asyncio.shield(
                    self._nft.run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
                )
            except NftError as exc:
                return self._failed(str(exc))
            return ApplyReport(1)


def _committed(have: TableState, want: TableState, plan: Plan[Key, object]) -> TableState:
    """`have` after the transaction for `plan` succeeded (mutated in place: O(plan)).

    Rules created here have no known handle; stray rules and foreign objects are gone."""
    dead_sets = {k[1] for k in plan.deletions if k[0] == "set"}
    dead_chains = {k[1] for k in plan.deletions if k[0] == "chain"}
    for key in plan.deletions:
        kind, name = key[0], key[1]
        if kind == "counter":
            have.counters.discard(name)
        elif kind == "set":
            have.sets.pop(name, None)
            have.elements.pop(name, None)
        elif kind == "chain":
            have.chains.pop(name, None)
        elif kind == "element" and name not in dead_sets:
            have.elements.get(name, {}).pop(key[2], None)
            have.raw_elements.pop((name, key[2]), None)
        elif kind == "rule":
            have.rules.pop((name, key[2]), None)
            have.rule_handles.pop((name, key[2]), None)
        have.handles.pop((kind, name), None)
    for chain, comment in [k for k in have.rules if k[0] in dead_chains] if dead_chains else ():
        have.rules.pop((chain, comment))
        have.rule_handles.pop((chain, comment), None)
    if dead_sets:
        have.raw_elements = {k: v for k, v in have.raw_elements.items() if k[0] not in dead_sets}
    for key in plan.upserts:
        kind, name = key[0], key[1]
        if kind == "counter":
            have.counters.add(name)
        elif kind == "set":
            have.sets[name] = want.sets[name]
            have.elements.setdefault(name, {})
        elif kind == "chain":
            have.chains[name] = want.chains[name]
        elif kind == "element":
            have.elements.setdefault(name, {})[key[2]] = want.elements[name][key[2]]
            have.raw_elements.pop((name, key[2]), None)
        elif kind == "rule":
            have.rules[(name, key[2])] = want.rules[(name, key[2])]
    have.stray_rules, have.foreign = [], []
    return have


def class_keys(state: TableState) -> Iterable[str]:
    """Classes present in a table (the `out_<class>` chains)."""
    return sorted(n[4:] for n in state.chains if n.startswith("out_"))
