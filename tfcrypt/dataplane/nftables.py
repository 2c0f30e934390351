"""The nftables reconciler: classification marks, strict ingress and the egress guard.

Rules of this module:
- Ownership is the table: tfcrypt owns `table inet tfcrypt` and everything in it, and
  touches nothing outside it. Whatever is in the table and not desired is removed.
- One apply = one read (`nft -j list table`) and at most one atomic transaction holding
  only the difference: set and map ELEMENTS are added and removed one by one (a set whose
  class still exists is never flushed and reloaded), objects of new classes are created and
  those of vanished classes deleted, base chains and rules are created if missing. A second
  apply with the same desired state sends nothing.
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
  is reported and everything stays pending for the next apply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from tfcrypt.dataplane.delta import DeltaTracker, Plan
from tfcrypt.dataplane.nft_json import Nft, NftError, NftUnreadable
from tfcrypt.dataplane.nft_model import (
    FAMILY,
    TABLE,
    Json,
    NftDesired,
    TableState,
    counter_values,
    desired_table,
    parse_listing,
)
from tfcrypt.dataplane.routes import ApplyReport, ItemError

log = logging.getLogger(__name__)

Key = tuple[str, ...]
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
        if verb == "delete":
            elem: list[object] = [have.raw_elements.get((name, ip), ip) for ip in ips]
        elif want.sets[name].map:
            elem = [[ip, {"jump": {"target": want.elements[name][ip]}}] for ip in ips]
        else:
            elem = list(ips)
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

    cmds += [_cmd("add", "counter", name=k[1]) for k in sorted(plan.upserts) if k[0] == "counter"]
    for key in sorted(k for k in plan.upserts if k[0] == "set"):
        spec = want.sets[key[1]]
        if spec.map:
            cmds.append(_cmd("add", "map", name=key[1], type=spec.type, map=spec.map))
        else:
            cmds.append(_cmd("add", "set", name=key[1], type=spec.type))
    for key in sorted(k for k in plan.upserts if k[0] == "chain"):
        hook = want.chains[key[1]]
        base = {} if hook is None else {"type": hook.type, "hook": hook.hook,
                                        "prio": hook.prio, "policy": hook.policy}
        cmds.append(_cmd("add", "chain", name=key[1], **base))
    cmds += _element_cmds("add", want, split(new, False), have)
    cmds += [
        _cmd("add", "rule", chain=r.chain, comment=r.comment, expr=r.expr_json())
        for key, r in want.rules.items() if ("rule", *key) in plan.upserts
    ]
    cmds += _element_cmds("add", want, split(new, True), have)

    cmds += [_cmd("flush", "chain", name=n) for n in sorted(dead_chains)]
    cmds += [_cmd("delete", "map", name=n) for n in sorted(dead_sets) if is_map[n]]
    cmds += [_cmd("delete", "chain", name=n) for n in sorted(dead_chains)]
    cmds += [_cmd("delete", "set", name=n) for n in sorted(dead_sets) if not is_map[n]]
    cmds += [_cmd("delete", "counter", name=k[1]) for k in sorted(plan.deletions)
             if k[0] == "counter"]
    return cmds


class NftManager:
    """Reconciles `table inet tfcrypt` with an `NftDesired`.

    Pitfalls:
    - nft refuses to add a map element whose key exists with another verdict (EEXIST): a
      local address moving to another class is a delete and an add of that one element.
    - Rule expressions are not compared (nft prints them normalised); the comment carries a
      hash of the expression we emitted, so a rule someone edited in place keeping our
      comment is not detected. Rules without our comment are removed.
    - Counters live in the kernel: a rebuild (only for a damaged table) resets them.
    """

    def __init__(self, nft: Nft) -> None:
        self._nft = nft
        self._desired: NftDesired | None = None
        self._want: TableState | None = None
        self._tracker: DeltaTracker[Key, object] = DeltaTracker()
        self._lock = asyncio.Lock()
        self.last_transaction: list[Json] = []

    def __repr__(self) -> str:
        classes = 0 if self._want is None else len(list(class_keys(self._want)))
        return f"NftManager(nft={self._nft!r}, classes={classes}, pending={len(self.pending)})"

    def set_desired(self, desired: NftDesired) -> None:
        """Record intent (no I/O); raises ConfigError for input that cannot be nft names."""
        want = desired_table(desired)
        self._desired, self._want = desired, want
        self._tracker.set_desired(want.items())

    @property
    def desired(self) -> NftDesired | None:
        return self._desired

    @property
    def pending(self) -> frozenset[Key]:
        """Objects whose kernel state differed from desired after the last apply."""
        if self._want is None:
            return frozenset()
        plan = self._tracker.plan()
        return frozenset(plan.upserts) | plan.deletions

    async def apply(self) -> ApplyReport:
        async with self._lock:
            if self._want is None:
                return ApplyReport(0)
            want = self._want
            try:
                listing = await self._nft.list_table()
                have = None if listing is None else parse_listing(listing)
            except NftUnreadable as exc:
                have = TableState(foreign=[str(exc)])
            except NftError as exc:
                return self._failed(f"list: {exc}")
            commands = self._plan(want, have)
            self.last_transaction = commands
            if not commands:
                return ApplyReport(0)
            try:
                await asyncio.shield(self._nft.run(commands))
            except NftError as exc:
                return self._failed(str(exc))
            self._tracker.load_actual(want.items().items())
            return ApplyReport(len(commands))

    def _plan(self, want: TableState, have: TableState | None) -> list[Json]:
        prefix: list[Json] = []
        if have is None:
            prefix = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
            have = TableState()
        elif reasons := _needs_rebuild(want, have):
            log.warning("nftables: rebuilding table %s %s: %s", FAMILY, TABLE, "; ".join(reasons))
            prefix = [{"delete": {"table": {"family": FAMILY, "name": TABLE}}},
                      {"add": {"table": {"family": FAMILY, "name": TABLE}}}]
            have = TableState()
        self._tracker.load_actual(have.items().items())
        return prefix + build_transaction(want, have, self._tracker.plan())

    def _failed(self, message: str) -> ApplyReport:
        log.warning("nftables: %s: %s", _ERROR_KEY, message)
        return ApplyReport(0, (ItemError(_ERROR_KEY, message),))

    async def counters(self) -> dict[str, tuple[int, int]]:
        """Named counters (guard_drops, ingress_drops, ingress_audit) and `out:<class>`."""
        listing = await self._nft.list_table()
        return {} if listing is None else counter_values(listing)

    async def remove(self) -> ApplyReport:
        """Delete the whole table (uninstall) and forget the desired state."""
        async with self._lock:
            self._desired = self._want = None
            self._tracker = DeltaTracker()
            try:
                if await self._nft.list_table() is None:
                    return ApplyReport(0)
                await asyncio.shield(
                    self._nft.run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
                )
            except NftError as exc:
                return self._failed(str(exc))
            return ApplyReport(1)


def class_keys(state: TableState) -> Iterable[str]:
    """Classes present in a table (the `out_<class>` chains)."""
    return sorted(n[4:] for n in state.chains if n.startswith("out_"))
