"""Sizes of unions of remote IP sets, counted without building the unions.

Why: a class selects the union of its selectors' results, and each remote IP is in ~30
class unions at 100,000 workloads; inserting every address of every set to count pairs
(or audit adds) cost more than all the rest of compute(). Two ways to count instead:

- `Bitmaps` (a full build: compute, and the incremental core's selector bitmaps): a set
  is a Python integer with one byte per numbered remote IP (0 or 1), so a union is an OR
  and a size a popcount, both in C.
- `SelectorMasks` (kept current by the incremental core): each remote IP's mask of the
  selectors holding it, and how many IPs carry each distinct mask; a union's size is a
  pass over the ~33,000 distinct masks.

Invariants:
- A Bitmaps position, once given to an IP, is that IP's for the object's life (`place`
  only appends), so a bitmap made earlier stays valid as the numbering grows; a set's
  bitmap is memoised by identity only while `forget` has not been called (the memo keeps
  the set alive so its id is not reused).
- A SelectorMasks bit, once given to a selector, is never reused; an IP with mask 0 has
  no entry; once `counts()` was asked for, `set` keeps the counts equal to
  Counter(mask.values()).
- `union_of` is the one union these modules build (for explain, tests, and the selected
  set): a frozenset, the input itself when every input is that one frozenset.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Set
from typing import Generic, TypeVar

_EMPTY: frozenset[str] = frozenset()
K = TypeVar("K", bound=Hashable)


def union_of(sets: Iterable[frozenset[str] | set[str]]) -> frozenset[str]:
    """The union as a frozenset: the one set itself when all others are the same object,
    else a copy of the largest set (a C-level copy, cheaper than re-inserting it) with
    the others added."""
    distinct = sorted({id(s): s for s in sets}.values(), key=len, reverse=True)
    if not distinct:
        return _EMPTY
    first = distinct[0] if isinstance(distinct[0], frozenset) else frozenset(distinct[0])
    return first.union(*distinct[1:]) if len(distinct) > 1 else first


def union_sizes(class_selectors: Mapping[str, Iterable[str]],
                selector_ips: Mapping[str, frozenset[str]]) -> dict[str, int]:
    """Class key -> size of the union of its selectors' sets, without building unions."""
    every = union_of(selector_ips.values())
    bitmaps = Bitmaps({ip: i for i, ip in enumerate(every)})
    memo: dict[frozenset[str], int] = {}
    sizes = {}
    for key, names in class_selectors.items():
        names = frozenset(names)
        found = memo.get(names)
        if found is None:
            found = memo[names] = bitmaps.union(selector_ips[n] for n in names).bit_count()
        sizes[key] = found
    return sizes


class SelectorMasks(Generic[K]):
    """Remote IP -> bit mask of the selectors whose result holds it, and how many IPs
    carry each distinct mask.

    This is how sizes of unions are counted without building them: |s1 u s2 u ...| is
    the number of IPs whose mask meets the bits of s1, s2, ...; at scale ~110,000 remote
    IPs fall into ~33,000 distinct masks, so a union size costs a pass over the distinct
    masks instead of inserting ~30,000 addresses per class. Bits are never reused.
    K is the type of the selectors' keys (the incremental core's: SelectorKey).
    """

    def __init__(self) -> None:
        self.bit: dict[K, int] = {}
        self.mask: dict[str, int] = {}
        self._counts: Counter[int] | None = None

    def add(self, key: K, ips: Iterable[str]) -> None:
        """A new selector and its current result."""
        b = self.bit[key] = 1 << len(self.bit)
        mask = self.mask
        if self._counts is None:
            for y in ips:
                mask[y] = mask.get(y, 0) | b
        else:
            for y in ips:
                self.set(y, mask.get(y, 0) | b)

    def of(self, keys: Iterable[K]) -> int:
        found = 0
        for key in keys:
            found |= self.bit[key]
        return found

    def set(self, ip: str, new: int) -> int:
        """Give `ip` the mask `new`; returns its old one."""
        old = self.mask.get(ip, 0)
        if new == old:
            return old
        if new:
            self.mask[ip] = new
        else:
            del self.mask[ip]
        counts = self._counts
        if counts is not None:
            if old:
                counts[old] -= 1
                if not counts[old]:
                    del counts[old]
            if new:
                counts[new] += 1
        return old

    def counts(self) -> Counter[int]:
        if self._counts is None:
            self._counts = Counter(self.mask.values())
        return self._counts

    def size(self, bits: int) -> int:
        """How many IPs carry some bit of `bits`."""
        return sum(n for m, n in self.counts().items() if m & bits)


class Bitmaps:
    """Remote IP sets as Python integers with one byte per remote IP (0 or 1), so that a
    union is an OR and a size a popcount, both in C over ~110 KB at scale, instead of
    inserting every address of every set (each remote IP is in ~30 class unions).

    `numbering` gives every remote IP a position; sets must hold only numbered IPs.
    """

    def __init__(self, numbering: dict[str, int], width: int | None = None) -> None:
        """`width`: one past the highest position (when the numbering has gaps, like an
        Inventory's slots after deletions); by default the numbering's size."""
        self.position = numbering
        self.width = len(numbering) if width is None else width
        self._of: dict[int, int] = {}
        self._alive: list[object] = []

    def of(self, ips: Set[str]) -> int:
        """The bitmap of a set (memoised by identity while the set is alive)."""
        found = self._of.get(id(ips))
        if found is None:
            raw = bytearray(self.width)
            for i in map(self.position.__getitem__, ips):
                raw[i] = 1
            found = self._of[id(ips)] = int.from_bytes(raw, "little")
            self._alive.append(ips)
        return found

    def forget(self) -> None:
        """Drop the identity memo (before the sets it names may be freed or mutated)."""
        self._of.clear()
        self._alive.clear()

    def place(self, ip: str) -> int:
        """The position of `ip`, numbering it if new (a growing numbering: positions are
        never reused, so a bitmap made before stays valid)."""
        found = self.position.get(ip)
        if found is None:
            found = self.position[ip] = self.width
            self.width += 1
        return found

    def grown(self, ips: Iterable[str]) -> int:
        """The bitmap of `ips`, numbering new IPs (no memo)."""
        found = 0
        raw = bytearray(self.width)
        extra = []
        for ip in ips:
            i = self.place(ip)
            if i < len(raw):
                raw[i] = 1
            else:
                extra.append(i)
        found = int.from_bytes(raw, "little")
        for i in extra:
            found |= 1 << (8 * i)
        return found

    def union(self, sets: Iterable[Set[str]]) -> int:
        found = 0
        for ips in sets:
            found |= self.of(ips)
        return found

    def holds(self, bitmap: int) -> Callable[[str], bool]:
        """A membership test for one bitmap (converted to bytes once)."""
        raw = bitmap.to_bytes(self.width, "little")
        return lambda ip: ip in self.position and raw[self.position[ip]] == 1


