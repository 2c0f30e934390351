"""The building blocks of the remote indexes (RemoteIndex, Inventory): claims, slots,
postings planned by key, and rows packed as integers.

Why: at 100,000 workloads the indexes' cost is object count and scattered memory reads,
not arithmetic; each structure here exists to avoid one (docs/policy.md, "compute() at
scale").

Invariants:
- ClaimMap: an IP maps to the workloads claiming it, in claim order, each claim once per
  `add`; an IP with one claimant has no container of its own, an IP with none has no
  entry; `shared()` lists exactly the IPs with more than one claimant.
- Slots: an index gives each remote IP a slot, a position from 0; a posting "by slot" is a
  set of slot positions and a row holds, for slot i, byte i (ASCII "0"/"1" while built,
  bit i once packed by `packed_row`/`packed_positions`). SlotsByAddress holds every slot
  with a non-negative address number, sorted by (number, slot): a subnet's slots are one
  bisected slice, in address order.
- planned_keys is a superset of the tag keys classify registers for those rules and
  local workloads; an index planned on them answers every selector of those rules.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import repeat

from tfcrypt.core.selection import RuleRef
from tfcrypt.model.workload import Network, Workload, network_span


class ClaimMap:
    """IP -> the workloads claiming it, without a container per IP.

    Nearly every IP has one claimant; 110,000 one-element lists would be 110,000 more
    objects for the cyclic garbage collector to walk on every full collection, which at
    this scale costs more than building them. Extra claimants live in a small side map.
    """

    def __init__(self) -> None:
        self._one: dict[str, Workload] = {}
        self._more: dict[str, list[Workload]] = {}

    def add(self, ip: str, w: Workload) -> None:
        more = self._more.get(ip)
        if more is not None:
            more.append(w)
        elif ip in self._one:
            self._more[ip] = [self._one.pop(ip), w]
        else:
            self._one[ip] = w

    def remove(self, ip: str, w: Workload) -> None:
        more = self._more.get(ip)
        if more is None:
            del self._one[ip]
            return
        more.remove(w)
        if len(more) == 1:
            self._one[ip] = more[0]
            del self._more[ip]

    def get(self, ip: str) -> Sequence[Workload]:
        one = self._one.get(ip)
        return (one,) if one is not None else self._more.get(ip, ())

    def __contains__(self, ip: str) -> bool:
        return ip in self._one or ip in self._more

    def copy(self, without: Iterable[str] = ()) -> ClaimMap:
        """A copy, with no claim on the IPs in `without` (C-level dict copies)."""
        found = ClaimMap()
        found._one = dict(self._one)
        found._more = {ip: list(ws) for ip, ws in self._more.items()}
        for ip in without:
            found._one.pop(ip, None)
            found._more.pop(ip, None)
        return found

    def shared(self) -> list[str]:
        """IPs with more than one claimant."""
        return list(self._more)



class SlotsByAddress:
    """Slots sorted by address, so that a subnet's slots are a bisected slice: slot i
    with address number n (`ip_number`) is packed as n << shift | i, and plain ints sort
    several times faster than with a key function. A negative number marks a free slot
    (an Inventory's), left out."""

    def __init__(self, numbers: Sequence[int]) -> None:
        self._shift = max(len(numbers), 1).bit_length()
        self._packed = [n << self._shift | i for i, n in enumerate(numbers) if n >= 0]
        self._packed.sort()

    def slots_in(self, network: Network) -> list[int]:
        first, last = network_span(network)
        packed, shift = self._packed, self._shift
        lo = bisect.bisect_left(packed, first << shift)
        hi = bisect.bisect_left(packed, (last + 1) << shift)
        mask = (1 << shift) - 1
        return [p & mask for p in packed[lo:hi]]


def planned_keys(rule_sets: Iterable[Sequence[RuleRef]], local: Iterable[Workload]
                 ) -> set[tuple[str, str]]:
    """Every tag key a selector of these rules can want on the remote side, for local
    workloads `local`: the endpoints' tags, and each match_tags type with the values the
    local workloads carry (a superset of what classify will register: cheap to find, and
    small, being bounded by the policies and the local inventory)."""
    local = tuple(local)
    found: set[tuple[str, str]] = set()
    for rules in rule_sets:
        for ref in rules:
            for endpoint in (ref.rule.endpoint1, ref.rule.endpoint2):
                if endpoint.tags is not None:
                    found |= {(t.type, t.value) for t in endpoint.tags}
            for tag_type in ref.rule.match_tags:
                found |= {(tag_type, v) for w in local
                          if (v := w.tag_value(tag_type)) is not None}
    return found


Rows = dict[tuple[str, str], bytearray]


def planned_postings(remote: Sequence[Workload], slots: list[str],
                      keys: frozenset[tuple[str, str]]
                      ) -> tuple[dict[tuple[str, str], set[int]], Rows]:
    """Postings of the planned keys: sets of slot positions, and rows of ASCII "0"/"1" by
    slot (slot i is `slots[i]`, the i-th IP of `remote`'s workloads, in their order).
    Positions rather than IP texts: an int hashes to itself, while hashing a text reads
    its scattered object (550,000 inserts at scale).

    One pass notes each workload's slot positions under its combination of single-valued
    tags (application, tier, deployment, site...: few combinations, an identity hit on an
    interned frozenset) and under each of its labels; a key's posting is then its
    combinations' positions, turned into IPs and row bytes by C loops (`map`). The
    workloads are walked in their given order on purpose: it is the order they sit in
    memory, and walking 100,000 of them grouped doubled the cost of every pass.
    """
    groups: dict[frozenset[tuple[str, str]], list[int]] = {}
    by_label: dict[tuple[str, str], list[int]] = {}
    at = 0
    for w in remote:
        single, labels = w.tag_key_split
        n = len(w.ips)
        found = groups.get(single)
        if found is None:
            found = groups[single] = []
        if n == 1:
            found.append(at)
            for label_key in labels:
                positions = by_label.get(label_key)
                if positions is None:
                    by_label[label_key] = [at]
                else:
                    positions.append(at)
        else:
            span = range(at, at + n)
            found.extend(span)
            for label_key in labels:
                by_label.setdefault(label_key, []).extend(span)
        at += n
    positions_of: dict[tuple[str, str], list[int]] = {
        k: v for k, v in by_label.items() if k in keys}
    for single, found in groups.items():
        for tag_key in single:
            if tag_key in keys:
                positions_of.setdefault(tag_key, []).extend(found)
    width = len(slots)
    sets: dict[tuple[str, str], set[int]] = {}
    rows: Rows = {}
    for tag_key, positions in positions_of.items():
        sets[tag_key] = set(positions)
        row = rows[tag_key] = bytearray(b"0") * width
        deque(map(row.__setitem__, positions, repeat(49)), maxlen=0)
    return sets, rows


def packed_row(row: bytearray) -> int:
    """An ASCII "0"/"1" row by slot (slot 0 first) as an int with bit i for slot i."""
    row.reverse()
    return int(row, 2) if row else 0


def packed_positions(positions: Iterable[int], width: int) -> int:
    """Slot positions as an int with bit i for slot i."""
    row = bytearray(b"0") * width
    for at in positions:
        row[at] = 49
    return packed_row(row)


