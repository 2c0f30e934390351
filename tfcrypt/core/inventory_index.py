"""InventoryIndex: one node's remote view of an Inventory, answering selectors for one
compute() from the postings and rows the Inventory keeps current (tfcrypt/core/inventory.py).

Invariants:
- A result is the intersection of the wanted postings (the subnet's included; every
  claimed address when nothing is wanted) minus the node's own addresses: what
  RemoteIndex answers, because no address is claimed twice (the constructor refuses an
  inventory with a shared one, `queryable` tells the caller beforehand).
- Only selectors within the planned tag keys are answered; a bitmap is the AND of the
  inventory's rows for the wanted keys and subnet, minus the local addresses' bits.
- Valid until the inventory next changes: bitmaps are by slot, and slots are reused.
  `forget_unused_rows` at the end of a query lets the inventory drop the rows it did not
  use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from tfcrypt.core.inventory import IndexKey, Inventory, TagKey
from tfcrypt.core.selection import SelectorKey, selector_key
from tfcrypt.model.policy import Endpoint
from tfcrypt.model.workload import Network


class InventoryIndex:
    """One node's remote view of an Inventory, for one compute(): RemoteIndex's query
    interface (register, result, bitmap, holds) answered from the maintained postings.

    Remote results are the postings' intersection without the node's own addresses. Only
    for an inventory with no shared address (see the module rules); `keys`, the planned
    tag keys, bound which rows the inventory keeps. Valid until the inventory changes
    (bitmaps are by slot, and slots are reused).
    """

    def __init__(self, inventory: Inventory, own_node: str,
                 keys: Iterable[TagKey]) -> None:
        if inventory.shared:
            raise ValueError("an address is claimed twice: use RemoteIndex")
        self.own_node = own_node
        self._inventory = inventory
        self._planned = frozenset(keys)
        self._local = set(inventory.ips_of(own_node))
        self._networks: dict[str, Network] = {}
        self._cache: dict[SelectorKey, frozenset[str]] = {}
        self._bitmaps: dict[SelectorKey, int] = {}
        self._remote_bits: int | None = None
        self._row_keys: set[IndexKey] = set()

    def register(self, endpoint: Endpoint, required: Iterable[TagKey]) -> SelectorKey:
        key = selector_key(endpoint, required)
        self._lookup(key)
        return key

    def result(self, key: SelectorKey) -> frozenset[str]:
        return self._cache[key]

    def select(self, endpoint: Endpoint, required: Iterable[TagKey]) -> frozenset[str]:
        return self._lookup(selector_key(endpoint, required))

    def bitmap(self, key: SelectorKey) -> int:
        """The selector's result as a bitmap over the inventory's slots: an AND of rows."""
        found = self._bitmaps.get(key)
        if found is None:
            wanted, subnet = key
            self._check_planned(wanted)
            inventory = self._inventory
            found = self._remote()
            for index_key in self._index_keys(wanted, subnet):
                found &= inventory.row(index_key)
            self._bitmaps[key] = found
        return found

    def holds(self, bitmap: int) -> Callable[[str], bool]:
        """A membership test of addresses (by text) in a `bitmap()` result."""
        raw = bitmap.to_bytes(self._inventory.width, "little")
        slot = self._inventory.slot

        def test(ip: str) -> bool:
            at = slot(ip)
            return at is not None and raw[at] == 1
        return test

    def forget_unused_rows(self) -> None:
        """Let the inventory drop rows this query did not use (call at its end)."""
        self._inventory.keep_only(self._row_keys)

    def _remote(self) -> int:
        if self._remote_bits is None:
            inventory = self._inventory
            self._remote_bits = inventory.row(None) & ~inventory.bitmap_of(self._local)
        return self._remote_bits

    def _index_keys(self, wanted: frozenset[TagKey], subnet: str | None) -> list[IndexKey]:
        keys: list[IndexKey] = list(wanted)
        if subnet is not None:
            keys.append(self._network(subnet))
        self._row_keys.update(keys)
        return keys

    def _network(self, subnet: str) -> Network:
        network = self._networks.get(subnet)
        if network is None:
            network = self._networks[subnet] = ipaddress.ip_network(subnet)
        return network

    def _check_planned(self, wanted: frozenset[TagKey]) -> None:
        if not wanted <= self._planned:
            raise ValueError(f"selector for {sorted(wanted - self._planned)}: not planned")

    def _lookup(self, key: SelectorKey) -> frozenset[str]:
        found = self._cache.get(key)
        if found is None:
            wanted, subnet = key
            self._check_planned(wanted)
            inventory = self._inventory
            sets = [inventory.posting(k) for k in wanted]
            if subnet is not None:
                sets.append(inventory.posting(self._network(subnet)))
            if not sets:
                sets.append(inventory.every())
            sets.sort(key=len)
            chosen = sets[0].intersection(*sets[1:])
            chosen -= self._local
            found = self._cache[key] = frozenset(chosen)
        return found
