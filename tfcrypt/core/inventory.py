"""Inventory: the workloads by key, with the indexes selection queries kept current.

Why: compute() at 1,000 nodes x 100 workloads spent most of its time walking 100,000
scattered Workload objects to index them by tag, on a VM where a random memory access
costs ~1 us (docs/policy.md, "compute() at scale"). The agent receives each workload once
(a watch event, verified once); indexing it then costs a few microseconds, and compute()
becomes a query: C-level set intersections over postings it did not build. This is how
Calico's Felix keeps its label index, updated per event instead of per calculation.

Rules:
- An Inventory is a read-only Mapping[str, Workload] for the core (Snapshot.workloads),
  changed only through `put`, `delete` and `sync` by its owner (the agent's loop, or a
  caller building one from a mapping). Pure: no I/O, no clock. Queries make and drop
  rows and subnet postings: caches, which never change what a query answers.
- Indexes cover every node's workloads; a node's remote view (`InventoryIndex`,
  tfcrypt/core/inventory_index.py) takes its own node's addresses out of each result.
  They hold for any inventory, but that view requires no address to be claimed twice
  (`shared` False): with a shared address the claimants' tags differ per claimant and the
  remote side is not "everything but our addresses", so compute() falls back to
  RemoteIndex (tfcrypt/core/remote_index.py), which re-checks claimants one by one.
- Postings: (type, value) -> the addresses of the workloads carrying that tag key; an
  address leaves a posting only when no claimant still carries the key. Subnet postings
  are made on first request (one scan) and kept current after it.
- Slots: every claimed address has a slot (a deleted address's slot is reused). Rows by
  slot (one byte per slot, 0 or 1) are kept for the keys and subnets selection asked for
  in its last query (`InventoryIndex` drops the others) and for large tag postings
  (LARGE_MIN, LARGE_SHARE): a selector's result as a bitmap is then an AND of rows, for
  union sizes counted by popcount. Not for every key: a tag type with one value per
  workload would otherwise cost slots x workloads bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    Set,
    ValuesView,
)
from itertools import repeat
from typing import cast

from tfcrypt.core.postings import ClaimMap, SlotsByAddress
from tfcrypt.core.remote_index import RemoteIndex
from tfcrypt.model.workload import Network, Workload, network_span

TagKey = tuple[str, str]
# A tag posting holding at least LARGE_MIN addresses and 1/LARGE_SHARE of the slots keeps
# its row from the moment it grows that large, asked for or not: building the rows at the
# first compute (~550,000 elements at scale, through an address -> slot lookup each) cost
# ~0.5 s, while kept current they cost a byte write per change. Bound: a slot sits in as
# many postings as its workload has tags (T), so at most LARGE_SHARE x T rows are large,
# each a byte per slot: 64 x 6 x 128 KiB = 48 MiB at worst for 100,000 slots and 6 tags;
# bench.compute's inventory keeps 79 (11 MiB with its subnets').
LARGE_MIN = 1024
LARGE_SHARE = 64
IndexKey = TagKey | Network  # a tag key, or a subnet


class Inventory(Mapping[str, Workload]):
    """Workloads by key, indexed for selection as they are put and deleted."""

    def __init__(self, workloads: Mapping[str, Workload] | None = None) -> None:
        self._workloads: dict[str, Workload] = {}
        self._claims = ClaimMap()
        self._every: set[str] = set()
        self._postings: dict[IndexKey, set[str]] = {}
        self._spans: dict[Network, tuple[int, int]] = {}  # subnets with a posting
        self._node_ips: dict[str, dict[str, int]] = {}  # node -> ip -> claims on it
        self._on_node: dict[str, dict[str, Workload]] = {}
        self._slot: dict[str, int] = {}
        self._ip_at: list[str | None] = []  # by slot (None: free)
        self._number_at: list[int] = []  # by slot: the address's ip_number (-1: free)
        self._by_number: SlotsByAddress | None = None  # until a slot changes
        self._free: list[int] = []
        self._width = 0
        self._rows: dict[IndexKey, bytearray] = {}
        self._live = bytearray()
        if workloads:
            for key, w in workloads.items():
                self.put(key, w)

    # -- the Mapping ----------------------------------------------------------------

    def __getitem__(self, key: str) -> Workload:
        return self._workloads[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._workloads)

    def __len__(self) -> int:
        return len(self._workloads)

    def __contains__(self, key: object) -> bool:
        return key in self._workloads

    def values(self) -> ValuesView[Workload]:
        return self._workloads.values()

    def items(self) -> ItemsView[str, Workload]:
        return self._workloads.items()

    def keys(self) -> KeysView[str]:
        return self._workloads.keys()

    # -- changes ----------------------------------------------------------------------

    def put(self, key: str, w: Workload) -> None:
        """Set `key` to `w` (replacing its previous value, if any). An equal value is
        kept as it is: a relist verifies every record again into new, equal objects."""
        old = self._workloads.get(key)
        if old is not None:
            if old is w or old == w:
                return
            self.delete(key)
        self._workloads[key] = w
        self._on_node.setdefault(w.node, {})[key] = w
        on_node = self._node_ips.setdefault(w.node, {})
        for ip, number in zip(w.ips, w.numbers, strict=True):
            new = ip not in self._claims
            self._claims.add(ip, w)
            on_node[ip] = on_node.get(ip, 0) + 1
            if new:
                self._every.add(ip)
                self._take_slot(ip, number)
                for network, (lo, hi) in self._spans.items():
                    if lo <= number <= hi:
                        self._add(network, ip)
            for tag_key in w.tag_keys:
                self._add(tag_key, ip)

    def delete(self, key: str) -> None:
        """Remove `key` (nothing if absent)."""
        w = self._workloads.pop(key, None)
        if w is None:
            return
        workloads = self._on_node[w.node]
        del workloads[key]
        if not workloads:
            del self._on_node[w.node]
        on_node = self._node_ips.get(w.node, {})
        for ip in w.ips:
            self._claims.remove(ip, w)
            left = on_node[ip] - 1
            if left:
                on_node[ip] = left
            else:
                del on_node[ip]
            others = self._claims.get(ip)
            for tag_key in w.tag_keys:
                if not any(tag_key in c.tag_keys for c in others):
                    self._discard(tag_key, ip)
            if not others:
                for network in self._spans:
                    self._discard(network, ip)
                self._every.discard(ip)
                self._free_slot(ip)
        if not on_node:
            self._node_ips.pop(w.node, None)

    def sync(self, source: Mapping[str, Workload], keys: Iterable[str] | None = None) -> None:
        """Make `keys` (every key of both sides when None) hold what they hold in `source`."""
        if keys is None:
            keys = self._workloads.keys() | source.keys()
        for key in list(keys):
            w = source.get(key)
            if w is None:
                self.delete(key)
            else:
                self.put(key, w)

    # -- queries ----------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether some address is claimed by more than one workload."""
        return bool(self._claims.shared())

    def nodes(self) -> list[str]:
        """Nodes whose workloads claim at least one address."""
        return list(self._node_ips)

    def ips_of(self, node: str) -> Set[str]:
        """Every address a workload on `node` claims (a live view: do not keep it)."""
        return self._node_ips.get(node, {}).keys()

    def workloads_on(self, node: str) -> list[Workload]:
        """The workloads on `node`."""
        return list(self._on_node.get(node, {}).values())

    def every(self) -> set[str]:
        """Every claimed address (a live set: do not change it)."""
        return self._every

    def posting(self, key: IndexKey) -> set[str]:
        """The addresses of workloads carrying tag key `key`, or inside subnet `key`
        (a live set: do not change it)."""
        found = self._postings.get(key)
        if found is None:
            if not isinstance(key, tuple):
                return self._subnet(key)
            return set()
        return found

    @property
    def width(self) -> int:
        """How many slots rows have (bitmaps are one byte per slot)."""
        return self._width

    def slot(self, ip: str) -> int | None:
        return self._slot.get(ip)

    def row(self, key: IndexKey | None) -> int:
        """The posting of `key` as a bitmap (byte i is 1 when slot i's address is in it);
        None: every claimed address. The row is kept current from now on, until
        `keep_only` leaves it out."""
        if key is None:
            return int.from_bytes(self._live, "little")
        row = self._rows.get(key)
        if row is None:
            row = self._make_row(key)
        return int.from_bytes(row, "little")

    def bitmap_of(self, ips: Iterable[str]) -> int:
        """Claimed addresses as a bitmap like `row`'s (unclaimed ones are ignored)."""
        raw = bytearray(self._width)
        slot = self._slot
        for ip in ips:
            at = slot.get(ip)
            if at is not None:
                raw[at] = 1
        return int.from_bytes(raw, "little")

    def keep_only(self, keys: Iterable[IndexKey]) -> None:
        """Stop keeping rows and subnet postings other than those of `keys` and the rows
        of large tag postings (a row is width bytes; subnets come and go with policies)."""
        keep = set(keys)
        for key in [k for k in self._rows if k not in keep and not (
                isinstance(k, tuple) and self._large(len(self._postings.get(k, ()))))]:
            del self._rows[key]
        for network in [n for n in self._spans if n not in keep]:
            del self._spans[network]
            del self._postings[network]

    # -- parts for the incremental core (copies: it changes them as it goes) ---------

    def remote_index(self, own_node: str) -> RemoteIndex:
        """A full RemoteIndex of every node but `own_node`, tracked, made of copies of
        the postings and claims (C-level set and dict copies, no pass over workloads)."""
        if self.shared:
            raise ValueError("an address is claimed twice: index the workloads")
        local = self.ips_of(own_node)
        remote: dict[str, Workload] = {}
        for node, workloads in self._on_node.items():
            if node != own_node:
                remote.update(workloads)
        postings: dict[TagKey, set[str]] = {}
        for key, posting in self._postings.items():
            if isinstance(key, tuple):
                copy = set(posting)
                if not posting.isdisjoint(local):
                    copy -= local
                if copy:
                    postings[key] = copy
        return RemoteIndex.tracked_from(own_node, remote, postings,
                                        self._claims.copy(without=local),
                                        self._every - local)

    def claims(self) -> ClaimMap:
        """A copy of who claims each address."""
        return self._claims.copy()

    def workloads_by_node(self) -> dict[str, dict[str, Workload]]:
        """node -> key -> workload, copied."""
        return {node: dict(workloads) for node, workloads in self._on_node.items()}

    def numbering(self) -> dict[str, int]:
        """address -> slot, copied (positions for Bitmaps, with `width`)."""
        return dict(self._slot)

    # -- internals --------------------------------------------------------------------

    def _add(self, key: IndexKey, ip: str) -> None:
        posting = self._postings.get(key)
        if posting is None:
            posting = self._postings[key] = set()
        posting.add(ip)
        row = self._rows.get(key)
        if row is not None:
            row[self._slot[ip]] = 1
        elif len(posting) >= LARGE_MIN and isinstance(key, tuple) and self._large(len(posting)):
            self._make_row(key)

    def _large(self, size: int) -> bool:
        """Whether a tag posting of `size` addresses keeps its row without being asked."""
        return size >= LARGE_MIN and size * LARGE_SHARE >= self._width

    def _make_row(self, key: IndexKey) -> bytearray:
        posting = self.posting(key)
        row = self._rows.get(key)
        if row is not None:  # a subnet's first posting comes with its row
            return row
        row = self._rows[key] = bytearray(len(self._live))
        # C loops (map into a zero-length deque): rows cover ~550,000 elements at scale
        deque(map(row.__setitem__, map(self._slot.__getitem__, posting), repeat(1)),
              maxlen=0)
        return row

    def _discard(self, key: IndexKey, ip: str) -> None:
        posting = self._postings.get(key)
        if posting is None or ip not in posting:
            return
        posting.discard(ip)
        if not posting and isinstance(key, tuple):
            del self._postings[key]
        row = self._rows.get(key)
        if row is not None:
            row[self._slot[ip]] = 0

    def _subnet(self, network: Network) -> set[str]:
        """A new subnet's posting: a bisected slice of the slots sorted by address (one
        sort serves every subnet asked for before the next change: a policy's subnets
        come together)."""
        if self._by_number is None:
            self._by_number = SlotsByAddress(self._number_at)
        slots = self._by_number.slots_in(network)
        # slots_in lists occupied slots only (a free slot's number is -1), whose address
        # is a str: the cast says so to mypy without a Python-level loop over the slice
        ip_at = cast("Callable[[int], str]", self._ip_at.__getitem__)
        found = self._postings[network] = set(map(ip_at, slots))
        # its row too, from the slots at hand (a subnet is asked for by a selector, whose
        # bitmap compute counts on): no lookup of each address's slot
        row = self._rows[network] = bytearray(len(self._live))
        deque(map(row.__setitem__, slots, repeat(1)), maxlen=0)
        self._spans[network] = network_span(network)
        return found

    def _take_slot(self, ip: str, number: int) -> None:
        self._by_number = None
        if self._free:
            at = self._free.pop()
            self._ip_at[at] = ip
            self._number_at[at] = number
        else:
            at = self._width
            self._width += 1
            self._ip_at.append(ip)
            self._number_at.append(number)
            if at == len(self._live):  # rows grow by doubling: amortised, not per slot
                grow = bytes(max(at, 64))
                self._live += grow
                for row in self._rows.values():
                    row += grow
        self._slot[ip] = at
        self._live[at] = 1

    def _free_slot(self, ip: str) -> None:
        self._by_number = None
        at = self._slot.pop(ip)
        self._live[at] = 0
        self._ip_at[at] = None
        self._number_at[at] = -1
        self._free.append(at)


def queryable(workloads: Mapping[str, Workload]) -> Inventory | None:
    """`workloads` as an Inventory whose indexes can answer (no address claimed twice),
    or None: then the caller indexes the workloads itself (RemoteIndex)."""
    if isinstance(workloads, Inventory) and not workloads.shared:
        return workloads
    return None
