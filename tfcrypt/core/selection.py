"""Which flows an encryption policy selects: the plain definition and one node's fast form.

Rules (DESIGN.md, "Policy model"; docs/policy.md):
- A flow between IP x of workload a and IP y of workload b is selected iff a and b are on
  different nodes and some rule of a policy in the wanted mode matches it either way round
  ((a,x) in endpoint1 and (b,y) in endpoint2, or the reverse), with every match_tags type
  carried by both with the same value. Union over rules and policies: adding a policy only
  ever adds pairs.
- Endpoint: tags -> the workload carries all of them (a `label=v` tag: v is one of its
  labels); subnet -> the IP lies in it; any -> always.
- An IP claimed by several workloads belongs to each of them for selection (selection can
  only add encryption); who gets it as an allowed IP is compute's decision.
- `is_selected_pairwise` is the definition, written for clarity; tests use it as the oracle.
- `classify` is the fast form for one node. Each local IP gets a class: the set of its
  memberships (policy, rule index, side, the local values of the rule's match_tags
  types). The class key is a hash of that set alone, never of remote content, so a change
  on another node changes set elements, never class identities; identical memberships
  share a class. Each membership has a remote SELECTOR (the other endpoint plus the local
  match_tags values); a class selects the union of its selectors' results. Results are
  found through a tag index (postings intersected as sets), never by a pairwise loop, and
  kept per selector: the union per class is never built outside tests and explain (at
  scale it would repeat each remote IP in ~30 classes). Selector names hash the selector
  alone, so they too are stable under remote churn.
- Union sizes (pair counts, audit counts) are counted without unions: `Bitmaps` (a full
  build: OR and popcount of one-byte-per-IP integers) or `SelectorMasks` (per-IP masks the
  incremental core keeps current).
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import json
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter
from typing import Any, Protocol

from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.workload import Workload, network_span

CLASS_KEY_PREFIX = "c"
SELECTOR_KEY_PREFIX = "s"
CLASS_KEY_HEX = 10
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def endpoint_matches(endpoint: Endpoint, workload: Workload, ip: str) -> bool:
    """Whether (workload, ip) is in `endpoint`."""
    if endpoint.tags is not None:
        return endpoint.tags <= workload.tags
    network = endpoint.network
    if network is not None:
        return ipaddress.ip_address(ip) in network
    return True


def match_tags_hold(rule: Rule, a: Workload, b: Workload) -> bool:
    """Every match_tags type is carried by both workloads, with the same value."""
    for tag_type in rule.match_tags:
        value = a.tag_value(tag_type)
        if value is None or value != b.tag_value(tag_type):
            return False
    return True


def rule_matches(rule: Rule, a: Workload, x: str, b: Workload, y: str) -> bool:
    """The rule selects (a,x)-(b,y), either way round (same-node is not checked here)."""
    if not match_tags_hold(rule, a, b):
        return False
    e1, e2 = rule.endpoint1, rule.endpoint2
    return ((endpoint_matches(e1, a, x) and endpoint_matches(e2, b, y))
            or (endpoint_matches(e2, a, x) and endpoint_matches(e1, b, y)))


def is_selected_pairwise(a: Workload, x: str, b: Workload, y: str,
                         policies: Iterable[EncryptionPolicy],
                         mode: Mode = Mode.ENFORCE) -> bool:
    """The definition: some `mode` rule selects the flow and it crosses nodes."""
    if a.node == b.node:
        return False
    return any(rule_matches(rule, a, x, b, y)
               for policy in policies if policy.mode is mode
               for rule in policy.rules)


@dataclass(frozen=True)
class RuleRef:
    """A rule with the name and index that identify it in memberships and explanations."""

    policy: str
    index: int
    rule: Rule
    _spans: tuple[tuple[int, int] | None, tuple[int, int] | None] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_spans", tuple(
            None if e.network is None else network_span(e.network)
            for e in (self.rule.endpoint1, self.rule.endpoint2)))

    def side_matches(self, side: int, workload: Workload, number: int) -> bool:
        """`endpoint_matches` for side 1 or 2 and an address given as its `ip_number`,
        with the subnet parsed once per rule."""
        endpoint = self.rule.endpoint1 if side == 1 else self.rule.endpoint2
        if endpoint.tags is not None:
            return endpoint.tags <= workload.tags
        span = self._spans[side - 1]
        return span is None or span[0] <= number <= span[1]


def rules_of(policies: Iterable[EncryptionPolicy], mode: Mode) -> tuple[RuleRef, ...]:
    """The rules of every `mode` policy, in policy-name then rule order."""
    return tuple(RuleRef(p.name, i, r)
                 for p in sorted(policies, key=lambda p: p.name) if p.mode is mode
                 for i, r in enumerate(p.rules))


@dataclass(frozen=True, order=True)
class Membership:
    """(a, x) sits on `side` of a rule; `values` are a's values of the rule's match_tags.

    The remote side of the pair must be in the other endpoint and carry these values.
    """

    policy: str
    rule: int
    side: int
    values: tuple[str, ...]


def memberships(workload: Workload, ip: str, rules: Sequence[RuleRef]) -> frozenset[Membership]:
    """Every rule side (a, ip) can stand on; a rule whose match_tags a lacks contributes none."""
    return workload_memberships(workload, rules).get(ip, frozenset())


def workload_memberships(workload: Workload, rules: Sequence[RuleRef]
                         ) -> dict[str, frozenset[Membership]]:
    """`memberships` of each of the workload's IPs that has any."""
    found: dict[str, set[Membership]] = {}
    for ref in rules:
        values: list[str] = []
        for tag_type in ref.rule.match_tags:
            value = workload.tag_value(tag_type)
            if value is None:
                break
            values.append(value)
        else:
            for ip, number in zip(workload.ips, workload.numbers, strict=True):
                for side in (1, 2):
                    if ref.side_matches(side, workload, number):
                        found.setdefault(ip, set()).add(
                            Membership(ref.policy, ref.index, side, tuple(values)))
    return {ip: frozenset(ms) for ip, ms in found.items()}


def class_key(signature: Iterable[Membership]) -> str:
    """"c" + 10 hex digits of a hash of the memberships: a valid nftables identifier."""
    text = json.dumps([[m.policy, m.rule, m.side, list(m.values)] for m in sorted(signature)],
                      separators=(",", ":"), ensure_ascii=False)
    return CLASS_KEY_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:CLASS_KEY_HEX]


SelectorKey = tuple[frozenset[tuple[str, str]], str | None]


class SelectorIndex(Protocol):
    """What classify and compute ask of an index of the remote workloads: RemoteIndex
    (built from the workloads, here) or InventoryIndex (tfcrypt/core/inventory.py, a
    query over an Inventory's maintained postings)."""

    def register(self, endpoint: Endpoint, required: Iterable[tuple[str, str]]
                 ) -> SelectorKey: ...

    def result(self, key: SelectorKey) -> frozenset[str] | set[str]: ...

    def bitmap(self, key: SelectorKey) -> int: ...

    def holds(self, bitmap: int) -> Callable[[str], bool]: ...


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
            by_slot, rows = _planned_postings(remote, flat, frozenset(keys))
            if self._multi:  # slots are positions in `flat`: unique IPs only
                self._postings = {k: set(map(flat.__getitem__, v)) for k, v in by_slot.items()}
            else:
                self._postings = {}
                self._by_slot = by_slot
                self._rows = {k: _packed(row) for k, row in rows.items()}
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

    def all_ips(self) -> frozenset[str]:
        return self._lookup((frozenset(), None))

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
                    found &= _packed_positions(self._slots_in(network), len(self._slots))
            else:
                position = self._positions()
                found = _packed_positions(map(position.__getitem__, self._lookup(key)),
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


def selector_key(endpoint: Endpoint, required: Iterable[tuple[str, str]]) -> SelectorKey:
    """The cache key of (endpoint, required tags on the remote side)."""
    wanted = set(required)
    if endpoint.tags is not None:
        wanted |= {(t.type, t.value) for t in endpoint.tags}
    return frozenset(wanted), endpoint.subnet


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


_IPS = attrgetter("ips")
_NUMBERS = attrgetter("numbers")
Rows = dict[tuple[str, str], bytearray]


def _planned_postings(remote: Sequence[Workload], slots: list[str],
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


def _packed(row: bytearray) -> int:
    """An ASCII "0"/"1" row by slot (slot 0 first) as an int with bit i for slot i."""
    row.reverse()
    return int(row, 2) if row else 0


def _packed_positions(positions: Iterable[int], width: int) -> int:
    """Slot positions as an int with bit i for slot i."""
    row = bytearray(b"0") * width
    for at in positions:
        row[at] = 49
    return _packed(row)


_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Classes:
    """One node's selection: local IP -> class key, class key -> its selectors' names,
    selector name -> the remote IPs it selects.

    A class selects the union of its selectors' sets; the union is never built here (it
    would repeat each remote IP in ~30 classes at scale): `class_peers` and `pairs` build
    it on demand, for tests, explain and small inventories. Every local IP with at least
    one membership has a class, even if its selectors select nobody today: then a remote
    workload appearing later only adds set elements. `signatures` and `selector_keys`
    (name -> SelectorKey) are how the classes were made (not compared).
    """

    local_class: Mapping[str, str]
    class_selectors: Mapping[str, frozenset[str]]
    selector_ips: Mapping[str, frozenset[str]]
    signatures: Mapping[str, frozenset[Membership]] = field(default_factory=dict,
                                                              compare=False)
    selector_keys: Mapping[str, SelectorKey] = field(default_factory=dict, compare=False)

    @property
    def class_peers(self) -> dict[str, frozenset[str]]:
        """Class key -> the union of its selectors' sets (built on demand: O(elements))."""
        return class_unions(self.class_selectors, self.selector_ips)

    def pairs(self) -> frozenset[tuple[str, str]]:
        """(local ip, remote ip) pairs; quadratic, for tests and small inventories."""
        peers = self.class_peers
        return frozenset((x, y) for x, key in self.local_class.items() for y in peers[key])

    def peers_of(self, ip: str) -> frozenset[str]:
        key = self.local_class.get(ip)
        if key is None:
            return frozenset()
        return union_of(self.selector_ips[s] for s in self.class_selectors[key])

    @property
    def pair_count(self) -> int:
        sizes = union_sizes(self.class_selectors, self.selector_ips)
        return sum(sizes[key] for key in self.local_class.values())

    def selected_remote_ips(self) -> frozenset[str]:
        """Every remote IP some class selects: the union of the selector sets."""
        return union_of(self.selector_ips.values())


def class_unions(class_selectors: Mapping[str, Iterable[str]],
                 selector_ips: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Class key -> the union of its selectors' sets."""
    return {key: union_of(selector_ips[s] for s in names)
            for key, names in class_selectors.items()}


class SelectorMasks:
    """Remote IP -> bit mask of the selectors whose result holds it, and how many IPs
    carry each distinct mask.

    This is how sizes of unions are counted without building them: |s1 u s2 u ...| is
    the number of IPs whose mask meets the bits of s1, s2, ...; at scale ~110,000 remote
    IPs fall into ~33,000 distinct masks, so a union size costs a pass over the distinct
    masks instead of inserting ~30,000 addresses per class. Bits are never reused.
    """

    def __init__(self) -> None:
        self.bit: dict[object, int] = {}
        self.mask: dict[str, int] = {}
        self._counts: Counter[int] | None = None

    def add(self, key: object, ips: Iterable[str]) -> None:
        """A new selector and its current result."""
        b = self.bit[key] = 1 << len(self.bit)
        mask = self.mask
        if self._counts is None:
            for y in ips:
                mask[y] = mask.get(y, 0) | b
        else:
            for y in ips:
                self.set(y, mask.get(y, 0) | b)

    def of(self, keys: Iterable[object]) -> int:
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


def local_signatures(own_node: str, workloads: Iterable[Workload], rules: Sequence[RuleRef]
                     ) -> dict[str, frozenset[Membership]]:
    """Each local IP's signature: the memberships of every local workload claiming it."""
    signature_of: dict[str, frozenset[Membership]] = {}
    for a in workloads:
        if a.node == own_node:
            for ip, found in workload_memberships(a, rules).items():
                signature_of[ip] = signature_of.get(ip, frozenset()) | found
    return signature_of


def classify(own_node: str, workloads: Iterable[Workload], rules: Sequence[RuleRef],
             index: SelectorIndex | None = None, *, results: bool = True) -> Classes:
    """The classes of `own_node`'s IPs under `rules` (pass `index` to share one).

    `results=False` leaves `selector_ips` empty and looks nothing up: for a caller that
    only counts, on `index.bitmap(key)` (compute's audit: its selectors' 114,000 result
    elements at scale were built and never read)."""
    workloads = tuple(workloads)
    if index is None:
        index = RemoteIndex(own_node, workloads)
    signature_of = local_signatures(own_node, workloads, rules)
    by_ref = {(ref.policy, ref.index): ref.rule for ref in rules}
    selector_of: dict[Membership, SelectorKey] = {}
    keys: dict[frozenset[Membership], str] = {}
    signatures: dict[str, frozenset[Membership]] = {}
    selectors: dict[str, frozenset[SelectorKey]] = {}
    for signature in sorted(set(signature_of.values()), key=sorted):
        key = _unique_key(class_key(signature), signatures)
        keys[signature] = key
        signatures[key] = signature
        for m in signature:
            if m not in selector_of:
                wanted = remote_selector(m, by_ref[(m.policy, m.rule)])
                selector_of[m] = (index.register(*wanted) if results
                                  else selector_key(*wanted))
        selectors[key] = frozenset(selector_of[m] for m in signature)
    names = selector_names(set(selector_of.values()))
    selector_ips = ({name: frozenset(index.result(s)) for s, name in names.items()}
                    if results else {})
    return Classes(
        local_class={x: keys[s] for x, s in signature_of.items()},
        class_selectors={k: frozenset(names[s] for s in ss) for k, ss in selectors.items()},
        selector_ips=selector_ips,
        signatures=signatures,
        selector_keys={name: s for s, name in names.items()})


def selector_text(key: SelectorKey) -> str:
    """A canonical spelling of a selector key (what its name hashes)."""
    wanted, subnet = key
    return json.dumps([sorted(wanted), subnet], separators=(",", ":"), ensure_ascii=False)


def selector_name(key: SelectorKey) -> str:
    """"s" + 10 hex digits of a hash of the selector key: a valid nftables identifier that
    depends on the selector alone (required remote tags and subnet), never on its result."""
    digest = hashlib.sha256(selector_text(key).encode()).hexdigest()
    return SELECTOR_KEY_PREFIX + digest[:CLASS_KEY_HEX]


def selector_names(keys: Iterable[SelectorKey]) -> dict[SelectorKey, str]:
    """Names of `keys`; a 40-bit collision gets a `_n` suffix in selector_text order."""
    names: dict[SelectorKey, str] = {}
    taken: dict[str, SelectorKey] = {}
    for key in sorted(keys, key=selector_text):
        name = _unique_key(selector_name(key), taken)
        taken[name] = key
        names[key] = name
    return names


def remote_selector(m: Membership, rule: Rule) -> tuple[Endpoint, list[tuple[str, str]]]:
    """What the remote side of membership `m` must satisfy: the other endpoint, and the
    local values of the rule's match_tags types."""
    other = rule.endpoint2 if m.side == 1 else rule.endpoint1
    return other, list(zip(rule.match_tags, m.values, strict=True))


def union_of(sets: Iterable[frozenset[str] | set[str]]) -> frozenset[str]:
    """The union as a frozenset: the one set itself when all others are the same object,
    else a copy of the largest set (a C-level copy, cheaper than re-inserting it) with
    the others added."""
    distinct = sorted({id(s): s for s in sets}.values(), key=len, reverse=True)
    if not distinct:
        return _EMPTY
    first = distinct[0] if isinstance(distinct[0], frozenset) else frozenset(distinct[0])
    return first.union(*distinct[1:]) if len(distinct) > 1 else first


def _unique_key(key: str, taken: Mapping[str, object]) -> str:
    """A 40-bit hash collision between two local signatures gets a suffix (sorted order)."""
    if key not in taken:
        return key
    n = 1
    while f"{key}_{n}" in taken:
        n += 1
    return f"{key}_{n}"
