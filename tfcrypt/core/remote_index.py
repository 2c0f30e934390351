"""RemoteIndex: the workloads of every node but one, indexed by tag for selectors.

Built from a plain collection of workloads (compute() and the incremental core when the
workloads are not an Inventory with unique addresses, explain, tests), or over parts an
Inventory kept current (`tracked_from`). Building blocks: tfcrypt/core/postings.py.

Invariants:
- A cached selector result (`result(key)`) is the set of remote IPs y with some remote
  claimant b such that b carries every wanted tag key and y lies in the subnet: what
  `is_selected_pairwise` asks of the remote side. Every selector looked up is cached, and
  once tracked every cached result is a live set `update` keeps equal to that.
- Postings hold, per tag key, the remote IPs with a claimant carrying it (slot positions
  instead in a planned index with unique IPs); an IP leaves a posting only when no
  claimant still carries the key. `_multi` is exactly the remote IPs
  claimed more than once, the only ones a multi-key selector re-checks claimant by claimant.
- Slots: untracked, slot i is the i-th remote IP in the order the workloads were given
  (first claim, once each); bitmaps (`bitmap`, `holds`) are by slot and exist only while
  untracked. A planned index (`keys=`) answers only selectors within its planned keys
  and never tracks.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Set
from itertools import chain
from operator import attrgetter
from typing import Any

from tfcrypt.core.postings import (
    ClaimMap,
    SlotsByAddress,
    packed_positions,
    packed_row,
    planned_postings,
)
from tfcrypt.core.selection import SelectorKey, selector_key
from tfcrypt.model.policy import Endpoint
from tfcrypt.model.workload import Network, Workload, network_span

_IPS = attrgetter("ips")
_NUMBERS = attrgetter("numbers")


class RemoteIndex:
    """The workloads of every node but one, indexed for `select`, optionally kept current.

    Postings are sets of remote IPs keyed by (type, value) tuples, intersected in C: at
    100,000 workloads a Python-level test per candidate is the cost that matters. A
    selector's result is cached by (required tag keys, subnet), so rules sharing a
    selector share the work and the frozenset. After `track`, `update` applies workload
    changes and edits in place the cached results the changed IPs enter or leave.

    Pitfalls: an IP claimed by two remote workloads sits in the postings of both; a
    multi-key selector re-checks such an IP against one claimant at a time. An IP claimed
    by both a local and a remote workload is a remote IP here (the remote claim selects
    it); compute keeps it out of every peer's allowed IPs.
    """

    def __init__(self, own_node: str, workloads: Iterable[Workload],
                 keys: Set[tuple[str, str]] | None = None, unique: bool = False) -> None:
        """Index the workloads of every node but `own_node`.

        `keys`, when given, are the only tag keys selectors will ask for (see
        `planned_keys`): postings are built for those alone, each also as a bitmap over
        slot positions, so that `bitmap()` is an AND of rows instead of one dict lookup per
        element (the cost that dominated compute() at 100,000 workloads). A planned index
        cannot `track`. Rows are width bytes each while built, which is why they are only
        made for planned keys: a tag type with a value per workload would otherwise cost
        width x workloads bytes. `unique`: the caller vouches that no IP is claimed by two
        workloads (compute counted it already), which spares a 100,000-element set here.
        """
        self.own_node = own_node
        remote = [w for w in workloads if w.node != own_node]
        self._listed = remote
        self._remote: dict[str, Workload] = {}
        self._tracked = False
        flat = list(chain.from_iterable(map(_IPS, remote)))
        self._every: set[str] | None = None
        self._claimants: ClaimMap | None = None
        self._multi: set[str] = set()
        if not unique:
            self._every = set(flat)
            if len(flat) != len(self._every):
                self._multi = set(self._claimant_map().shared())
        self._planned = None if keys is None else frozenset(keys)
        self._rows: dict[tuple[str, str], int] | None = None
        self._by_slot: dict[tuple[str, str], set[int]] | None = None
        if keys is None:
            lists: dict[tuple[str, str], list[str]] = defaultdict(list)
            for w in remote:
                ips = w.ips
                for tag_key in w.tag_keys:
                    lists[tag_key].extend(ips)
            self._postings = {k: set(v) for k, v in lists.items()}
        else:
            by_slot, rows = planned_postings(remote, flat, frozenset(keys))
            if self._multi:  # slots are positions in `flat`: unique IPs only
                self._postings = {k: set(map(flat.__getitem__, v)) for k, v in by_slot.items()}
            else:
                self._postings = {}
                self._by_slot = by_slot
                self._rows = {k: packed_row(row) for k, row in rows.items()}
        self._slots = flat if not self._multi else list(dict.fromkeys(flat))
        self._position: dict[str, int] | None = None
        self._bitmaps: dict[SelectorKey, int] = {}
        self._by_address: SlotsByAddress | None = None
        self._subnet_slots: dict[Network, list[int]] = {}
        self._cache: dict[SelectorKey, frozenset[str] | set[str]] = {}
        self._networks: dict[str, Network] = {}
        self._updated = False  # by `update`: the listed workloads and slots are stale

    @classmethod
    def tracked_from(cls, own_node: str, remote: dict[str, Workload],
                     postings: dict[tuple[str, str], set[str]], claimants: ClaimMap,
                     every: set[str]) -> RemoteIndex:
        """A full index, tracked from the start, over parts an Inventory keeps current
        (tfcrypt/core/inventory.py: no pass over the workloads). The parts are the
        index's own from now on (its updates change them): pass copies. The caller
        vouches that no remote IP is claimed twice."""
        index = cls(own_node, ())
        index._listed = list(remote.values())
        index._remote = remote
        index._postings = postings
        index._claimants = claimants
        index._every = every
        index._slots = list(chain.from_iterable(map(_IPS, index._listed)))
        index._tracked = True
        return index

    @property
    def _all(self) -> set[str]:
        """Every remote IP (built on first use when the caller vouched for uniqueness)."""
        if self._every is None:
            self._every = set(self._slots)
        return self._every

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return tuple(self._remote.values()) if self._tracked else tuple(self._listed)

    def select(self, endpoint: Endpoint, required: Iterable[tuple[str, str]]) -> frozenset[str]:
        """Remote IPs y of workloads b with (b, y) in `endpoint` and `required` tags on b."""
        return frozenset(self._lookup(selector_key(endpoint, required)))

    def register(self, endpoint: Endpoint, required: Iterable[tuple[str, str]]) -> SelectorKey:
        """Make sure the selector is cached (so `update` keeps it current); its key."""
        key = selector_key(endpoint, required)
        self._lookup(key)
        return key

    def result(self, key: SelectorKey) -> frozenset[str] | set[str]:
        """The current result of a registered selector. Once `track` was called it is a
        live set that later updates change in place: copy it to keep it."""
        return self._cache[key]

    def numbering(self) -> dict[str, int]:
        """Every remote IP -> a position (for Bitmaps)."""
        return {ip: i for i, ip in enumerate(self._all)}

    def bitmap(self, key: SelectorKey) -> int:
        """A selector's result as an int whose bit i is set when the remote IP in
        slot i is in it (slots: `holds`). Untracked indexes only.

        With planned rows this is an AND of the rows of the wanted keys (and of the
        subnet's slots): no per-element work. Otherwise (no plan, or an IP claimed by two
        remote workloads, whose rows would count it twice) it is built from the result
        set, one position lookup per element.
        """
        if self._tracked:
            raise RuntimeError("bitmaps describe an untracked index")
        found = self._bitmaps.get(key)
        if found is None:
            wanted, subnet = key
            rows = self._rows
            if rows is not None:
                self._check_planned(wanted)
                found = (1 << len(self._slots)) - 1
                for tag_key in wanted:
                    found &= rows.get(tag_key, 0)
                network = self._network(subnet)
                if network is not None:
                    found &= packed_positions(self._slots_in(network), len(self._slots))
            else:
                position = self._positions()
                found = packed_positions(map(position.__getitem__, self._lookup(key)),
                                          len(self._slots))
            self._bitmaps[key] = found
        return found

    def holds(self, bitmap: int) -> Callable[[str], bool]:
        """A membership test of remote IPs (by text) in a `bitmap()` result."""
        width = len(self._slots)
        raw = format(bitmap, f"0{width}b") if width else ""
        position = self._positions()

        def test(ip: str) -> bool:
            at = position.get(ip)
            return at is not None and raw[width - 1 - at] == "1"
        return test

    def _positions(self) -> dict[str, int]:
        if self._position is None:
            self._position = {ip: i for i, ip in enumerate(self._slots)}
        return self._position

    def selectors(self) -> list[SelectorKey]:
        """Every cached selector (registered or looked up), in registration order."""
        return list(self._cache)

    def track(self) -> None:
        """Switch to incremental use: claimants mapped, selector results kept as live sets
        changed in place by `update` (a change then costs its size, not the result's)."""
        if self._planned is not None:
            raise RuntimeError("a planned index has postings for its planned keys only")
        if self._tracked:
            return
        self._claimant_map()
        self._remote = {w.key: w for w in self._listed}
        self._tracked = True
        self._bitmaps.clear()
        self._rows = None
        for key, found in self._cache.items():
            self._cache[key] = set(found)

    def _lookup(self, key: SelectorKey) -> frozenset[str] | set[str]:
        found = self._cache.get(key)
        if found is None:
            found = self._select(*key)
            self._cache[key] = set(found) if self._tracked else found
        return found

    def _network(self, subnet: str | None) -> Network | None:
        if subnet is None:
            return None
        network = self._networks.get(subnet)
        if network is None:
            network = self._networks[subnet] = ipaddress.ip_network(subnet)
        return network

    def _check_planned(self, wanted: frozenset[tuple[str, str]]) -> None:
        if self._planned is not None and not wanted <= self._planned:
            raise ValueError(f"selector for {sorted(wanted - self._planned)}: not planned")

    def _select(self, wanted: frozenset[tuple[str, str]], subnet: str | None) -> frozenset[str]:
        self._check_planned(wanted)
        network = self._network(subnet)
        by_slot = self._by_slot  # planned, unique IPs: postings are slot positions
        postings: Mapping[tuple[str, str], Set[Any]] = (
            self._postings if by_slot is None else by_slot)
        sets: list[Any] = [postings.get(k, frozenset()) for k in wanted]
        if network is not None:
            sets.append(self._ips_in(network) if by_slot is None
                        else set(self._slots_in(network)))
        if not sets:
            return frozenset(self._all)
        sets.sort(key=len)
        found = sets[0].intersection(*sets[1:])
        if by_slot is not None:
            return frozenset(map(self._slots.__getitem__, found))
        if len(wanted) > 1 and self._multi:
            found -= {y for y in found & self._multi if not self._holds(y, wanted, None)}
        return frozenset(found)

    def _holds(self, ip: str, wanted: frozenset[tuple[str, str]],
               network: Network | None) -> bool:
        """Whether one remote claimant of `ip` carries every wanted tag (and ip in network)."""
        claimants = self._claimant_map().get(ip)
        if not claimants:
            return False
        if network is not None and ipaddress.ip_address(ip) not in network:
            return False
        return any(wanted <= w.tag_keys for w in claimants)

    def _claimant_map(self) -> ClaimMap:
        if self._claimants is None:
            self._claimants = ClaimMap()
            for w in self.workloads:
                for ip in w.ips:
                    self._claimants.add(ip, w)
        return self._claimants

    def _ips_in(self, network: Network) -> set[str]:
        if self._updated:  # a new subnet selector after an update: rare, one scan
            lo, hi = network_span(network)
            return {ip for w in self._remote.values()
                    for ip, number in zip(w.ips, w.numbers, strict=True)
                    if lo <= number <= hi}
        return set(map(self._slots.__getitem__, self._slots_in(network)))

    def _slots_in(self, network: Network) -> list[int]:
        """The slots whose IP is in `network` (until the first update)."""
        found = self._subnet_slots.get(network)
        if found is None:
            if self._by_address is None:
                numbers = list(chain.from_iterable(map(_NUMBERS, self._listed)))
                if self._multi:
                    numbers = list(dict(zip(chain.from_iterable(map(_IPS, self._listed)),
                                            numbers, strict=True)).values())
                self._by_address = SlotsByAddress(numbers)
            found = self._subnet_slots[network] = self._by_address.slots_in(network)
        return found

    # -- keeping the index current (the incremental core) ---------------------------------

    def update(self, removed: Iterable[Workload], added: Iterable[Workload]
               ) -> tuple[set[str], set[SelectorKey]]:
        """Apply workload changes; return the IPs touched and the cached selectors whose
        result changed. Local workloads are ignored."""
        claimants = self._claimant_map()
        self._updated = True
        self._by_address = None
        self._subnet_slots.clear()
        touched: set[str] = set()
        for w in removed:
            if w.node == self.own_node:
                continue
            del self._remote[w.key]
            touched.update(w.ips)
            for ip in w.ips:
                claimants.remove(ip, w)
                others = claimants.get(ip)
                if not others:
                    self._all.discard(ip)
                for tag_key in w.tag_keys:
                    if not any(tag_key in c.tag_keys for c in others):
                        posting = self._postings[tag_key]
                        posting.discard(ip)
                        if not posting:
                            del self._postings[tag_key]
        for w in added:
            if w.node == self.own_node:
                continue
            self._remote[w.key] = w
            touched.update(w.ips)
            for ip in w.ips:
                if ip not in claimants:
                    self._all.add(ip)
                claimants.add(ip, w)
                for tag_key in w.tag_keys:
                    self._postings.setdefault(tag_key, set()).add(ip)
        for ip in touched:
            if len(claimants.get(ip)) > 1:
                self._multi.add(ip)
            else:
                self._multi.discard(ip)
        return touched, self._refresh(touched)

    def _refresh(self, touched: set[str]) -> set[SelectorKey]:
        changed: set[SelectorKey] = set()
        for key, old in list(self._cache.items()):
            wanted, subnet = key
            network = self._network(subnet)
            now = {y for y in touched if self._holds(y, wanted, network)}
            enter = now - old
            leave = (touched - now) & old
            if enter or leave:
                changed.add(key)
                live = old if isinstance(old, set) else set(old)
                live -= leave
                live |= enter
                self._cache[key] = live
        return changed

